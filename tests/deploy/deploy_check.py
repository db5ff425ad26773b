"""Do the Kubernetes manifests agree with the supervisor? Reads rendered manifests and the
supervisor's own option parser and HTTP routes; returns the disagreements as sentences."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from vllm_dp_supervisor.api.server import build_app
from vllm_dp_supervisor.loops.teardown import KILL_GRACE_S
from vllm_dp_supervisor.settings.config import Config, DeviceKind
from vllm_dp_supervisor.settings.options import parse_config

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
READINESS_PATHS = {"/ready", "/readyz", "/health"}
WORKLOADS = {"Deployment", "StatefulSet", "LeaderWorkerSet"}
# What LeaderWorkerSet's webhook sets in every pod of a group, for the configs read here.
LWS_ENV = {"LWS_LEADER_ADDRESS": "vllm-moe-0.vllm-moe", "LWS_GROUP_SIZE": "2"}


def render(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run([str(BIN / "kubectl"), "kustomize", str(ROOT / "deploy" / "overlays" / overlay)],
                         check=True, capture_output=True, text=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def supervisor_paths() -> set[str]:
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


def _configs(container: dict, indexes: list[int]) -> list[Config]:
    """The supervisor's config as each pod would parse it."""
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    # the one field-ref value we use is the pod's index (a StatefulSet's, or a group's)
    from_fields = [e["name"] for e in container.get("env", []) if "fieldRef" in e.get("valueFrom", {})]
    args = [re.sub(r"\$\((\w+)\)", lambda m: LWS_ENV.get(m.group(1), m.group(0)), a) for a in container.get("args", [])]
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


def check(objects: list[dict[str, Any]]) -> list[str]:
    problems: list[str] = []
    paths = supervisor_paths()
    templates = [t for o in objects if o["kind"] in WORKLOADS for t in pod_templates(o)]
    if not templates:
        return ["no Deployment, StatefulSet or LeaderWorkerSet"]
    container_ports: dict[str, set[str]] = {}
    rank_ports_of: dict[str, set[int]] = {}
    for name, template, indexes in templates:
        pod = template["spec"]
        container = pod["containers"][0]
        try:
            configs = _configs(container, indexes)
        except Exception as exc:  # ConfigError, or a malformed env entry
            problems.append(f"{name}: the supervisor rejects its configuration: {exc}")
            continue
        cfg = configs[0]
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
        app = template["metadata"]["labels"].get("app.kubernetes.io/name", "")
        container_ports.setdefault(app, set()).update(ports)
        rank_ports_of.setdefault(app, set()).update(cfg.rank_ports)

        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = container.get(kind)
            if probe is None:
                if kind != "startupProbe":
                    problems.append(f"{name}: no {kind}")
                continue
            path = probe.get("httpGet", {}).get("path")
            if path not in paths:
                problems.append(f"{name}: {kind} path {path} does not exist on the supervisor")
            if _probe_port(probe, ports) != cfg.supervisor_port:
                problems.append(f"{name}: {kind} port is not --supervisor-port {cfg.supervisor_port}")
            if kind != "readinessProbe" and path in READINESS_PATHS | {"/ready/{rank}"}:
                budget = probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * \
                    probe.get("failureThreshold", 3)
                if kind == "livenessProbe":
                    problems.append(f"{name}: livenessProbe points at {path}: it would kill a pod that is "
                                    "loading, draining or restarting a rank; use /live")
                if budget < cfg.startup_timeout:
                    problems.append(f"{name}: {kind} on {path} can kill the pod after {budget} s, before "
                                    f"--startup-timeout {cfg.startup_timeout:g} s has run out")
        ready = container.get("readinessProbe", {})
        if ready and ready.get("httpGet", {}).get("path") not in READINESS_PATHS:
            problems.append(f"{name}: readinessProbe must use /ready")
        if ready and not 2 <= ready.get("periodSeconds", 10) <= 5:
            problems.append(f"{name}: readinessProbe period {ready.get('periodSeconds', 10)} s is not 2-5 s")

        rank_ports = {v for k, v in ports.items() if k.startswith("rank-")}
        if rank_ports != set(cfg.rank_ports):
            problems.append(f"{name}: rank container ports {sorted(rank_ports)} are not --port "
                            f"{cfg.port}..{cfg.port + cfg.dp_size_local - 1}")
        gpus = int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        if cfg.device is DeviceKind.CPU:
            if gpus:
                problems.append(f"{name}: requests {gpus} GPUs for CPU ranks")
        elif gpus != cfg.dp_size_local * cfg.devices_per_rank:
            problems.append(f"{name}: requests {gpus} GPUs, the supervisor needs "
                            f"{cfg.dp_size_local} ranks x {cfg.devices_per_rank} = "
                            f"{cfg.dp_size_local * cfg.devices_per_rank}")
        # The stop budget: the router settles, then drains (at most --stop-timeout), then the ranks
        # stop (at most the effective --stop-timeout), then SIGKILL and its grace.
        router_part = 0.0 if cfg.router_port is None else cfg.router_settle + cfg.stop_timeout
        needed = _prestop_seconds(container) + router_part + cfg.stop_budget + KILL_GRACE_S
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if grace < needed:
            problems.append(f"{name}: terminationGracePeriodSeconds {grace} < preStop + router settle and drain "
                            f"+ --stop-timeout + kill grace = {needed:g}: the kubelet would SIGKILL mid-stop")
        if cfg.router_port is not None and ports.get("router") != cfg.router_port:
            problems.append(f"{name}: no container port named router at --router-port {cfg.router_port}")
        shm = {v["name"] for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"}
        if not any(m["mountPath"] == "/dev/shm" and m["name"] in shm for m in container.get("volumeMounts", [])):
            problems.append(f"{name}: /dev/shm is not a memory emptyDir (vLLM needs it)")
        for extra in configs[1:]:
            if extra.data_parallel_start_rank + extra.dp_size_local > extra.dp_size:
                problems.append(f"{name}: pod ranks overflow --data-parallel-size")

    for svc in (o for o in objects if o["kind"] == "Service"):
        app = svc["spec"].get("selector", {}).get("app.kubernetes.io/name", "")
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort")
            if isinstance(target, str) and target not in container_ports.get(app, set()):
                problems.append(f"Service/{svc['metadata']['name']}: targetPort {target} is no container port")
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        spec = deployment["spec"]
        container = spec["template"]["spec"]["containers"][0]
        try:
            startup = _configs(container, [0])[0].startup_timeout
        except Exception:  # a configuration the supervisor rejects: said above
            continue
        deadline = spec.get("progressDeadlineSeconds", 600)
        if deadline <= startup:
            problems.append(f"Deployment/{deployment['metadata']['name']}: progressDeadlineSeconds {deadline} <= "
                            f"--startup-timeout {startup:g}: a slow model load would read as a failed rollout")
    for pool in (o for o in objects if o["kind"] == "InferencePool"):
        app = pool["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/name", "")
        targets = {p["number"] for p in pool["spec"]["targetPorts"]}
        if targets != rank_ports_of.get(app, set()):
            problems.append(f"InferencePool/{pool['metadata']['name']}: targetPorts {sorted(targets)} are not the "
                            f"rank ports {sorted(rank_ports_of.get(app, set()))}")
    return problems
