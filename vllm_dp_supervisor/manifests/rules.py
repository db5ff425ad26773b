"""What Kubernetes manifests must agree on with the supervisor their pods run: each rule reads
rendered objects and the supervisor's own option parser and routes, and says a disagreement as a
sentence. Pure: it reads dicts, never a file, a cluster or a process."""

from __future__ import annotations

import re
from typing import Any

from vllm_dp_supervisor.api.server import build_app
from vllm_dp_supervisor.loops.teardown import KILL_GRACE_S
from vllm_dp_supervisor.settings import service_links
from vllm_dp_supervisor.settings.config import ENV_PREFIX, PROG, Config, DeviceKind
from vllm_dp_supervisor.settings.options import parse_config

READINESS_PATHS = {"/ready", "/readyz", "/health"}
WORKLOADS = {"Deployment", "StatefulSet", "LeaderWorkerSet"}
# What LeaderWorkerSet's webhook sets in every pod of a group: stand-ins, only so that arguments
# such as `--data-parallel-address $(LWS_LEADER_ADDRESS)` parse.
LWS_ENV = {"LWS_LEADER_ADDRESS": "llm-moe-0.llm-moe", "LWS_GROUP_SIZE": "2"}


def supervisor_paths() -> set[str]:
    """The paths the supervisor's API answers, read from its own routes."""
    from vllm_dp_supervisor.core.events import EventLog

    class RoutesOnly:
        events = EventLog()
    def unused(*args: object) -> object:
        raise AssertionError("only the routes are read; no handler runs")
    app = build_app(RoutesOnly(), unused, unused, None)  # type: ignore[arg-type]
    return {getattr(r, "path", "") for r in app.routes}


def pod_templates(workload: dict) -> list[tuple[str, dict, list[int]]]:
    """(name, pod template, the indexes of its pods: a StatefulSet's or a group's) of a workload."""
    name, spec = f"{workload['kind']}/{workload['metadata']['name']}", workload["spec"]
    if workload["kind"] == "LeaderWorkerSet":
        group = spec["leaderWorkerTemplate"]
        worker = group["workerTemplate"]
        return [(f"{name} leader", group.get("leaderTemplate", worker), [0]),
                (f"{name} workers", worker, list(range(1, group.get("size", 1))))]
    return [(name, spec["template"], list(range(spec.get("replicas", 1) if workload["kind"] == "StatefulSet"
                                                else 1)))]


def supervisor_container(pod: dict) -> dict:
    """The pod's container that runs the supervisor: the one its command or environment names
    (a sidecar may come first), else the first."""
    containers = pod["containers"]
    for container in containers:
        words = [*container.get("command", []), *(e.get("name", "") for e in container.get("env", []))]
        if any(PROG in w or w.startswith(ENV_PREFIX) for w in words):
            return container
    return containers[0]


def _supervisor_args(container: dict) -> list[str]:
    """The supervisor's own argv: the image's entrypoint runs it with `args`; a `command` that names
    it passes what follows it too."""
    command = container.get("command", [])
    named = [i for i, word in enumerate(command) if word.rsplit("/", 1)[-1] in (PROG, "vllm_dp_supervisor")]
    return [*command[named[0] + 1:], *container.get("args", [])] if named else list(container.get("args", []))


def _configs(container: dict, indexes: list[int]) -> list[Config]:
    """The supervisor's config as each pod would parse it."""
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    # the one field-ref value we use is the pod's index (a StatefulSet's, or a group's)
    from_fields = [e["name"] for e in container.get("env", []) if "fieldRef" in e.get("valueFrom", {})]
    args = [re.sub(r"\$\((\w+)\)", lambda m: LWS_ENV.get(m.group(1), m.group(0)), a)
            for a in _supervisor_args(container)]
    return [parse_config(args, {**env, **{n: str(index) for n in from_fields}}) for index in indexes or [0]]


def _prestop_seconds(container: dict) -> float:
    pre = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    text = " ".join(pre.get("exec", {}).get("command", []))
    sleeps = [float(x) for x in re.findall(r"sleep\(\s*([\d.]+)\s*\)", text)]
    return sum(sleeps) + (5.0 if "urlopen" in text else 0.0)  # + the request's own timeout


def _probe_port(probe: dict, ports: dict[str, int]) -> int | None:
    port = probe.get("httpGet", {}).get("port")
    return ports.get(port) if isinstance(port, str) else port


def problems(objects: list[dict[str, Any]]) -> list[str]:
    """Every disagreement between the objects and the supervisor their pods run, as sentences."""
    templates = [t for o in objects if o["kind"] in WORKLOADS for t in pod_templates(o)]
    if not templates:
        return ["no Deployment, StatefulSet or LeaderWorkerSet"]
    found: list[str] = []
    paths = supervisor_paths()
    container_ports: dict[str, set[str]] = {}
    rank_ports_of: dict[str, set[int]] = {}
    for name, template, indexes in templates:
        pod = template["spec"]
        container = supervisor_container(pod)
        try:
            configs = _configs(container, indexes)
        except Exception as exc:  # ConfigError, or a malformed env entry
            found.append(f"{name}: the supervisor rejects its configuration: {exc}")
            continue
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
        app = template["metadata"]["labels"].get("app.kubernetes.io/name", "")
        container_ports.setdefault(app, set()).update(ports)
        rank_ports_of.setdefault(app, set()).update(configs[0].rank_ports)
        own = _probe_problems(container, ports, configs[0], paths) + _pod_problems(pod, container, ports, configs)
        found += [f"{name}: {problem}" for problem in own + _link_problems(pod, objects)]
    return found + _service_problems(objects, container_ports) + _deployment_problems(objects) + \
        _pool_problems(objects, rank_ports_of)


def _probe_problems(container: dict, ports: dict[str, int], cfg: Config, paths: set[str]) -> list[str]:
    found = []
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = container.get(kind)
        if probe is None:
            if kind != "startupProbe":
                found.append(f"no {kind}")
            continue
        path = probe.get("httpGet", {}).get("path")
        if path not in paths:
            found.append(f"{kind} path {path} does not exist on the supervisor")
        if _probe_port(probe, ports) != cfg.supervisor_port:
            found.append(f"{kind} port is not --supervisor-port {cfg.supervisor_port}")
        if kind != "readinessProbe" and path in READINESS_PATHS | {"/ready/{rank}"}:
            budget = probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * \
                probe.get("failureThreshold", 3)
            if kind == "livenessProbe":
                found.append(f"livenessProbe points at {path}: it would kill a pod that is loading, draining "
                             "or restarting a rank; use /live")
            if budget < cfg.startup_timeout:
                found.append(f"{kind} on {path} can kill the pod after {budget} s, before --startup-timeout "
                             f"{cfg.startup_timeout:g} s has run out")
    ready = container.get("readinessProbe", {})
    if ready and ready.get("httpGet", {}).get("path") not in READINESS_PATHS:
        found.append("readinessProbe must use /ready")
    if ready and not 2 <= ready.get("periodSeconds", 10) <= 5:
        found.append(f"readinessProbe period {ready.get('periodSeconds', 10)} s is not 2-5 s")
    return found


def _pod_problems(pod: dict, container: dict, ports: dict[str, int], configs: list[Config]) -> list[str]:
    found, cfg = [], configs[0]
    rank_ports = {v for k, v in ports.items() if k.startswith("rank-")}
    if rank_ports != set(cfg.rank_ports):
        found.append(f"rank container ports {sorted(rank_ports)} are not --port "
                     f"{cfg.port}..{cfg.port + cfg.dp_size_local - 1}")
    gpus = int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
    if cfg.device is DeviceKind.CPU:
        if gpus:
            found.append(f"requests {gpus} GPUs for CPU ranks")
    elif gpus != cfg.dp_size_local * cfg.devices_per_rank:
        found.append(f"requests {gpus} GPUs, the supervisor needs {cfg.dp_size_local} ranks x "
                     f"{cfg.devices_per_rank} = {cfg.dp_size_local * cfg.devices_per_rank}")
    # The stop budget: the router settles, then drains (at most --stop-timeout), then the ranks
    # stop (at most the effective --stop-timeout), then SIGKILL and its grace.
    router_part = 0.0 if cfg.router_port is None else cfg.router_settle + cfg.stop_timeout
    needed = _prestop_seconds(container) + router_part + cfg.stop_budget + KILL_GRACE_S
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace < needed:
        found.append(f"terminationGracePeriodSeconds {grace} < preStop + router settle and drain + --stop-timeout "
                     f"+ kill grace = {needed:g}: the kubelet would SIGKILL mid-stop")
    if cfg.router_port is not None and ports.get("router") != cfg.router_port:
        found.append(f"no container port named router at --router-port {cfg.router_port}")
    shm = {v["name"] for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"}
    if not any(m["mountPath"] == "/dev/shm" and m["name"] in shm for m in container.get("volumeMounts", [])):
        found.append("/dev/shm is not a memory emptyDir (vLLM needs it)")
    if any(c.data_parallel_start_rank + c.dp_size_local > c.dp_size for c in configs[1:]):
        found.append("pod ranks overflow --data-parallel-size")
    return found


def _link_problems(pod: dict, objects: list[dict[str, Any]]) -> list[str]:
    """A Service whose name is a prefix vLLM or the supervisor reads, in a pod with service links."""
    if pod.get("enableServiceLinks") is False:
        return []
    reader = {"VLLM_": "vLLM reads as its port and dies on", "SUPERVISOR_": "the supervisor reads as --port"}
    return [f"Service/{name} gives it {prefix}PORT=tcp://... (a Kubernetes service link), which "
            f"{reader[prefix.split('_')[0] + '_']}: set enableServiceLinks: false in the pod spec, or rename "
            "the Service"
            for name in sorted(o["metadata"]["name"] for o in objects if o["kind"] == "Service")
            if (prefix := service_links.service_env_prefix(name)).startswith(service_links.PREFIXES)]


def _service_problems(objects: list[dict[str, Any]], container_ports: dict[str, set[str]]) -> list[str]:
    found = []
    for svc in (o for o in objects if o["kind"] == "Service"):
        app = svc["spec"].get("selector", {}).get("app.kubernetes.io/name", "")
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort")
            if isinstance(target, str) and target not in container_ports.get(app, set()):
                found.append(f"Service/{svc['metadata']['name']}: targetPort {target} is no container port")
    return found


def _deployment_problems(objects: list[dict[str, Any]]) -> list[str]:
    found = []
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        spec = deployment["spec"]
        try:
            startup = _configs(supervisor_container(spec["template"]["spec"]), [0])[0].startup_timeout
        except Exception:  # a configuration the supervisor rejects: said above
            continue
        deadline = spec.get("progressDeadlineSeconds", 600)
        if deadline <= startup:
            found.append(f"Deployment/{deployment['metadata']['name']}: progressDeadlineSeconds {deadline} <= "
                         f"--startup-timeout {startup:g}: a slow model load would read as a failed rollout")
    return found


def _pool_problems(objects: list[dict[str, Any]], rank_ports_of: dict[str, set[int]]) -> list[str]:
    found = []
    for pool in (o for o in objects if o["kind"] == "InferencePool"):
        app = pool["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/name", "")
        targets = {p["number"] for p in pool["spec"]["targetPorts"]}
        if targets != rank_ports_of.get(app, set()):
            found.append(f"InferencePool/{pool['metadata']['name']}: targetPorts {sorted(targets)} are not the "
                         f"rank ports {sorted(rank_ports_of.get(app, set()))}")
    return found
