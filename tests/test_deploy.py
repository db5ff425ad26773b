"""Dockerfile and Kubernetes manifests: render, validate, lint, and agree with the supervisor."""

from __future__ import annotations

import copy
import json
import re
import subprocess

import pytest
from conftest import ROOT, free_ports
from deploy_check import BIN, check, render

OVERLAYS = ["replicas", "moe-dp", "cpu-demo", "per-rank"]


def run_tool(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, **kw)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(overlay, tmp_path):
    rendered = run_tool("kubectl", "kustomize", str(ROOT / "deploy" / "overlays" / overlay))
    assert rendered.returncode == 0, rendered.stderr
    out = tmp_path / "rendered.yaml"
    out.write_text(rendered.stdout)
    result = run_tool("kubernetes-validate", "--strict", "--quiet", str(out))
    assert result.returncode == 0, result.stdout + result.stderr


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
    "service to nowhere": (lambda o: next(x for x in o if x["metadata"]["name"] == "vllm")["spec"]["ports"][0]
                           .update(targetPort="rank-9"), "targetPort rank-9 is no container port"),
    "router port moved": (lambda o: env(o, "SUPERVISOR_ROUTER_PORT", "8090"),
                          "no container port named router at --router-port 8090"),
    "settle not budgeted": (lambda o: env(o, "SUPERVISOR_ROUTER_SETTLE", "30"), "terminationGracePeriodSeconds"),
}


@pytest.mark.parametrize("breakage", BREAKAGES, ids=list(BREAKAGES))
def test_consistency_check_catches_a_broken_manifest(breakage):
    objects = copy.deepcopy(render("replicas"))
    mutate, expected = BREAKAGES[breakage]
    mutate(objects)
    problems = check(objects)
    assert any(expected in p for p in problems), problems


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


def test_the_image_healthcheck_asks_live(tmp_path, base_env, start):
    healthchecks = dockerfile_exec_forms("HEALTHCHECK")
    assert healthchecks and all(h == ["python3", "-m", "vllm_dp_supervisor.healthcheck"] for h in healthchecks)
    env = {**base_env, "PATH": f"{BIN}:{base_env['PATH']}"}
    nobody = subprocess.run(healthchecks[0], cwd=tmp_path, capture_output=True, text=True,
                            env={**env, "SUPERVISOR_SUPERVISOR_PORT": str(free_ports(1)[0])})
    assert nobody.returncode == 1 and "healthcheck:" in nobody.stderr
    run = start(1)
    run.wait_ready()
    up = subprocess.run(healthchecks[0], cwd=tmp_path, capture_output=True, text=True,
                        env={**env, "SUPERVISOR_SUPERVISOR_PORT": str(run.supervisor_port)})
    assert up.returncode == 0, up.stderr
    run.send(__import__("signal").SIGTERM)
    assert run.wait_exit() == 0
