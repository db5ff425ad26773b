"""Dockerfile and Kubernetes manifests: render, validate, lint, and agree with the supervisor."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess

import psutil
import pytest
import yaml
from crd_check import custom_kinds, validate
from deploy_check import BIN, check, render
from harness import ROOT, free_ports, get_raw, wait_for
from monitoring_check import dashboard, exported_series, queried_series

OVERLAYS = ["replicas", "moe-dp", "moe-dp-lws", "cpu-demo", "per-rank", "inference-pool"]


def run_tool(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, **kw)


def validate_strictly(directory, tmp_path) -> None:
    """Kubernetes' own kinds against its OpenAPI schemas, custom ones against their CRDs' (tests/crds)."""
    rendered = run_tool("kubectl", "kustomize", str(directory))
    assert rendered.returncode == 0, rendered.stderr
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    custom = [d for d in docs if d["kind"] in custom_kinds()]
    assert [problem for d in custom for problem in validate(d)] == []
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all([d for d in docs if d not in custom]))
    result = run_tool("kubernetes-validate", "--strict", "--quiet", str(out))
    # a warning is a kind it has no schema for: every kind must be checked by one or the other
    assert result.returncode == 0 and "WARN" not in result.stdout + result.stderr, result.stdout + result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(overlay, tmp_path):
    validate_strictly(ROOT / "deploy" / "overlays" / overlay, tmp_path)


def test_monitoring_renders_and_validates_against_the_crds(tmp_path):
    validate_strictly(ROOT / "deploy" / "monitoring", tmp_path)


CRD_BREAKAGES = {
    "PodMonitor": (lambda d: d["spec"]["podMetricsEndpoints"][0].update(intervall="15s"), "intervall"),
    "PrometheusRule": (lambda d: d["spec"]["groups"][0]["rules"][0].update(severity="critical"), "severity"),
    "LeaderWorkerSet": (lambda d: d["spec"]["leaderWorkerTemplate"].update(size="two"), "size"),
    "InferencePool": (lambda d: d["spec"].update(targetPorts=[{"number": p} for p in range(8000, 8009)]),
                      "targetPorts"),
}


@pytest.mark.parametrize("kind", CRD_BREAKAGES)
def test_crd_validation_rejects_a_broken_custom_resource(kind):
    docs = [d for place in ("overlays/moe-dp-lws", "overlays/inference-pool", "monitoring")
            for d in yaml.safe_load_all(run_tool("kubectl", "kustomize", str(ROOT / "deploy" / place)).stdout) if d]
    doc = copy.deepcopy(next(d for d in docs if d["kind"] == kind))
    assert validate(doc) == []
    mutate, field = CRD_BREAKAGES[kind]
    mutate(doc)
    problems = validate(doc)
    assert problems and any(field in p for p in problems), problems


def test_the_podmonitor_scrapes_the_supervisor_port_of_every_workload():
    monitor = next(d for d in yaml.safe_load_all((ROOT / "deploy" / "monitoring" / "podmonitor.yaml").read_text()))
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    for overlay in OVERLAYS:
        objects = render(overlay)
        for o in objects:
            if o["kind"] in ("Deployment", "StatefulSet", "LeaderWorkerSet"):
                templates = [o["spec"]["template"]] if "template" in o["spec"] else \
                    [o["spec"]["leaderWorkerTemplate"][t] for t in ("leaderTemplate", "workerTemplate")]
                for template in templates:
                    assert monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
                    ports = {p.get("name") for p in template["spec"]["containers"][0]["ports"]}
                    assert endpoint["port"] in ports, (overlay, o["metadata"]["name"])
    # the ranks are asked within --probe-timeout (2 s by default): well inside the scrape's own timeout
    assert float(endpoint["scrapeTimeout"].rstrip("s")) > 2 * 2


def test_the_dashboard_is_grafana_json_with_a_query_in_every_panel():
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["targets"] and all(t["expr"].strip() and t["refId"] for t in panel["targets"]), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "namespace", "pod"} <= variables
    # Only the PodMonitor's scrape: the router's port serves the same /metrics, and a pod scraped
    # there too (another job) would count twice in every sum.
    selectors = [sel for p in board["panels"] for t in p["targets"] for sel in re.findall(r"\{[^}]*\}", t["expr"])
                 if "namespace" in sel]
    assert selectors and all('job="vllm-dp-supervisor"' in sel for sel in selectors)


def test_every_series_the_dashboard_and_alerts_query_is_exported_and_documented(start):
    """Against a real scrape: the stand-in's vllm:* series are the names vLLM 0.32 exports (the
    real-vLLM test checks them on vLLM itself)."""
    import urllib.request
    run = start(2, options=["--deep-probe-interval", "0.2"])
    run.wait_ready()
    request = urllib.request.Request(f"http://127.0.0.1:{run.router_port}/v1/completions", method="POST",
                                     data=b'{"prompt": "hi", "max_tokens": 1}',
                                     headers={"Content-Type": "application/json"})
    assert urllib.request.urlopen(request, timeout=10).status == 200
    code, body = get_raw(run.supervisor_port, "/metrics")
    assert code == 200
    exported = exported_series(body.decode())
    queried = queried_series()
    assert {n for n in queried if n.startswith("vllm:")} and {n for n in queried if n.startswith("supervisor_")}
    assert sorted(queried - exported) == []
    readme = (ROOT / "docs" / "observability.md").read_text()
    assert sorted(n for n in queried if n.startswith("supervisor_") and f"`{n}`" not in readme and
                  f"`{n.rsplit('_', 1)[0]}`" not in readme) == []
    run.send(__import__("signal").SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_agrees_with_the_supervisor(overlay):
    assert check(render(overlay)) == []


def test_strict_validation_rejects_an_unknown_field(tmp_path):
    text = run_tool("kubectl", "kustomize", str(ROOT / "deploy" / "overlays" / "replicas")).stdout
    out = tmp_path / "broken.yaml"
    out.write_text(text.replace("periodSeconds: 3", "periodSecond: 3"))
    result = run_tool("kubernetes-validate", "--strict", "--quiet", str(out))
    assert result.returncode != 0 and "periodSecond" in result.stdout


def test_yaml_is_lint_clean():
    result = run_tool("yamllint", "--strict", str(ROOT / "deploy"), cwd=ROOT)
    assert result.returncode == 0, result.stdout


def container(objects):
    return next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]


def env(objects, name, value):
    entries = container(objects)["containers"][0]["env"]
    for e in entries:
        if e["name"] == name:
            e["value"] = value
            return
    entries.append({"name": name, "value": value})


BREAKAGES = {
    "liveness on /ready": (lambda o: container(o)["containers"][0]["livenessProbe"]["httpGet"].update(path="/ready"),
                           "livenessProbe points at /ready"),
    "grace too short": (lambda o: container(o).update(terminationGracePeriodSeconds=30),
                        "terminationGracePeriodSeconds 30 <"),
    "stop timeout raised": (lambda o: env(o, "SUPERVISOR_STOP_TIMEOUT", "120"), "terminationGracePeriodSeconds"),
    "rank port off": (lambda o: container(o)["containers"][0]["ports"][4].update(containerPort=9000),
                      "rank container ports"),
    "supervisor port moved": (lambda o: env(o, "SUPERVISOR_SUPERVISOR_PORT", "9300"),
                              "readinessProbe port is not --supervisor-port 9300"),
    "gpu count": (lambda o: container(o)["containers"][0]["resources"]["limits"].update({"nvidia.com/gpu": "3"}),
                  "requests 3 GPUs, the supervisor needs 4 ranks x 1 = 4"),
    "tp not counted": (lambda o: container(o)["containers"][0]["args"].extend(["-tp", "2"]),
                       "the supervisor needs 4 ranks x 2 = 8"),
    "probe path typo": (lambda o: container(o)["containers"][0]["readinessProbe"]["httpGet"].update(path="/readiness"),
                        "readinessProbe path /readiness does not exist"),
    "slow readiness": (lambda o: container(o)["containers"][0]["readinessProbe"].update(periodSeconds=30),
                       "readinessProbe period 30 s is not 2-5 s"),
    "startup probe too short": (lambda o: container(o)["containers"][0].update(startupProbe={
        "httpGet": {"path": "/ready", "port": "supervisor"}, "periodSeconds": 10, "failureThreshold": 30}),
        "startupProbe on /ready can kill the pod after 300 s, before --startup-timeout 1800 s"),
    "no shm": (lambda o: next(v for v in container(o)["volumes"] if v["name"] == "dshm").pop("emptyDir"),
               "/dev/shm is not a memory emptyDir"),
    "bad env": (lambda o: env(o, "SUPERVISOR_PROBE_INTERVAL", "soon"), "the supervisor rejects its configuration"),
    "service to nowhere": (lambda o: next(x for x in o if x["metadata"]["name"] == "llm")["spec"]["ports"][0]
                           .update(targetPort="rank-9"), "targetPort rank-9 is no container port"),
    "router port moved": (lambda o: env(o, "SUPERVISOR_ROUTER_PORT", "8090"),
                          "no container port named router at --router-port 8090"),
    "settle not budgeted": (lambda o: env(o, "SUPERVISOR_ROUTER_SETTLE", "30"), "terminationGracePeriodSeconds"),
    "rollout deadline": (lambda o: next(x for x in o if x["kind"] == "Deployment")["spec"].pop(
        "progressDeadlineSeconds"), "progressDeadlineSeconds 600 <= --startup-timeout 1800"),
}


@pytest.mark.parametrize("breakage", BREAKAGES, ids=list(BREAKAGES))
def test_consistency_check_catches_a_broken_manifest(breakage):
    objects = copy.deepcopy(render("replicas"))
    mutate, expected = BREAKAGES[breakage]
    mutate(objects)
    problems = check(objects)
    assert any(expected in p for p in problems), problems


def test_an_inference_pool_must_target_exactly_the_rank_ports():
    objects = copy.deepcopy(render("inference-pool"))
    next(o for o in objects if o["kind"] == "InferencePool")["spec"]["targetPorts"].pop()
    assert any("targetPorts [8000, 8001, 8002] are not the rank ports [8000, 8001, 8002, 8003]" in p
               for p in check(objects))


def test_the_leaderworkerset_pods_take_ranks_8_apart_and_reach_the_leader():
    from vllm_dp_supervisor.manifests.rules import _configs, pod_templates
    lws = next(o for o in render("moe-dp-lws") if o["kind"] == "LeaderWorkerSet")
    (_, leader, lead), (_, worker, work) = pod_templates(lws)
    configs = _configs(leader["spec"]["containers"][0], lead) + _configs(worker["spec"]["containers"][0], work)
    assert [c.data_parallel_start_rank for c in configs] == [0, 8]
    assert {c.data_parallel_address for c in configs} == {"llm-moe-0.llm-moe"}  # $(LWS_LEADER_ADDRESS)
    assert all(c.dp_size == 16 for c in configs)


def test_hadolint_passes_and_every_ignore_is_explained():
    result = run_tool("hadolint", str(ROOT / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], f"unexplained: {line}"


def dockerfile_exec_forms(instruction: str) -> list[list[str]]:
    text = (ROOT / "Dockerfile").read_text()
    return [json.loads(m) for m in re.findall(rf"^{instruction}.*?(\[.*\])\s*$", text, re.M)]


def test_the_image_entrypoint_resolves_outside_a_container(tmp_path, base_env):
    entrypoints = dockerfile_exec_forms("ENTRYPOINT")
    assert entrypoints and all(e == ["python3", "-m", "vllm_dp_supervisor"] for e in entrypoints)
    # python3 of this environment, from a directory that is not the source tree: the installed
    # package must resolve, not the working directory's
    env = {**base_env, "PATH": f"{BIN}:{base_env['PATH']}"}
    result = subprocess.run([*entrypoints[0], "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "--dp-size-local" in result.stdout, result.stderr


def other_supervisors() -> list[str]:
    from vllm_dp_supervisor.healthcheck import is_supervisor
    return [" ".join(p.info["cmdline"]) for p in psutil.process_iter(["cmdline"])
            if p.pid != os.getpid() and is_supervisor(p.info["cmdline"] or [])]


def test_the_image_healthcheck_asks_live(tmp_path, base_env, start):
    healthchecks = dockerfile_exec_forms("HEALTHCHECK")
    assert healthchecks and all(h == ["python3", "-m", "vllm_dp_supervisor.healthcheck"] for h in healthchecks)
    env = {**base_env, "PATH": f"{BIN}:{base_env['PATH']}"}
    # In a container the supervisor is alone; here the HEALTHCHECK would read another test run's
    # supervisor first (it takes the first it finds in /proc): none may be running.
    wait_for(lambda: not other_supervisors(), 60, "no other supervisor on this machine")
    nobody = subprocess.run(healthchecks[0], cwd=tmp_path, capture_output=True, text=True,
                            env={**env, "SUPERVISOR_SUPERVISOR_PORT": str(free_ports(1)[0])})
    assert nobody.returncode == 1 and "healthcheck:" in nobody.stderr
    run = start(1)
    run.wait_ready()
    up = subprocess.run(healthchecks[0], cwd=tmp_path, capture_output=True, text=True,
                        env={**env, "SUPERVISOR_SUPERVISOR_PORT": str(run.supervisor_port)})
    assert up.returncode == 0, up.stderr
    # the port given only as the supervisor's flag (the harness passes --supervisor-port): read
    # from its command line, as a HEALTHCHECK beside it must
    assert f"--supervisor-port {run.supervisor_port}" in " ".join(psutil.Process(run.pid).cmdline())
    by_flag = subprocess.run(healthchecks[0], cwd=tmp_path, capture_output=True, text=True,
                             env={k: v for k, v in env.items() if k != "SUPERVISOR_SUPERVISOR_PORT"})
    assert by_flag.returncode == 0, by_flag.stderr
    run.send(__import__("signal").SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_service_is_named_after_a_prefix_the_pod_reads(overlay):
    """The kubelet turns a Service's name into <NAME>_PORT=tcp://... in every pod of the namespace that
    lacks enableServiceLinks: false: a Service named vllm... gives vLLM a VLLM_PORT it dies on."""
    names = [o["metadata"]["name"] for o in render(overlay) if o["kind"] == "Service"]
    assert names and not [n for n in names if n.upper().replace("-", "_").startswith(("VLLM", "SUPERVISOR"))]


def test_the_quick_start_s_edits_point_the_image_at_your_registry_and_name_a_storage_class(tmp_path):
    """deploy/README.md's `sed` lines, run on a copy of deploy/ as a user runs them, render the
    pushed image and a named storage class."""
    import shutil
    block = (ROOT / "deploy" / "README.md").read_text().split("```", 2)[1]
    edits = [line for line in block.splitlines() if line.startswith("sed -i")]
    assert len(edits) == 2
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    for line in edits:
        subprocess.run(["bash", "-c", line], cwd=tmp_path, check=True,
                       env={"PATH": "/usr/bin:/bin", "REGISTRY": "reg.test/me"})
    out = subprocess.run([str(BIN / "kubectl"), "kustomize", str(tmp_path / "deploy" / "overlays" / "replicas")],
                         check=True, capture_output=True, text=True).stdout
    objects = [d for d in yaml.safe_load_all(out) if d]
    pod = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"].startswith("reg.test/me/vllm-dp-supervisor:")
    claim = next(o for o in objects if o["kind"] == "PersistentVolumeClaim")
    assert claim["spec"]["storageClassName"] == "YOUR-RWX-CLASS" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
