"""Each overlay's pod, started with the environment the kubelet would give it: the container's
env (values, optional secrets left out as the kubelet leaves them, field references), its args
with $(VAR) expanded, and the service links of every Service in the namespace, the shipped ones
and the names they used to have (`vllm`, `vllm-supervisor`, `supervisor`), as if the pod had
forgotten `enableServiceLinks: false`.

What this machine cannot give the pod is replaced, and only that: stand-in ranks for the model
(no GPU, no download; the main real-vLLM test runs real ranks with the old Services' links),
free ports, two ranks, and the mounts (the admin token's secret, the log directory's emptyDir)
as files here. The Deployment overlays start and get ready; the data-parallel ones (one pod of a
16-rank group across nodes) are checked with --dry-run.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from typing import Any

import psutil
import pytest
from deploy_check import render
from harness import STANDIN_CMD
from kubelet_env import OLD_SERVICES, service_links

from vllm_dp_supervisor.manifests.rules import LWS_ENV

STARTED = ["replicas", "cpu-demo", "per-rank", "inference-pool"]
DRY_RUN = ["moe-dp", "moe-dp-lws"]


def pod_of(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pod spec and the supervisor's container of an overlay's workload (a LeaderWorkerSet's leader)."""
    for o in objects:
        spec = o.get("spec", {})
        template = spec.get("template") or spec.get("leaderWorkerTemplate", {}).get("leaderTemplate")
        if template:
            pod = template["spec"]
            return pod, next(c for c in pod["containers"] if c["name"] == "vllm")
    raise AssertionError("no workload")


def kubelet_env(objects: list[dict[str, Any]], container: dict[str, Any], extra: dict[str, str]) -> dict[str, str]:
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443", "HOSTNAME": "vllm-0", **extra}
    for i, svc in enumerate(o for o in objects if o["kind"] == "Service"):
        ports = [(p.get("name"), p["port"], p.get("protocol", "TCP")) for p in svc["spec"]["ports"]]
        env.update(service_links(svc["metadata"]["name"], f"10.96.1.{i + 1}", ports))
    env.update(OLD_SERVICES)
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), var["value"])
        elif "fieldRef" in var.get("valueFrom", {}):
            env[var["name"]] = "0"  # a pod index or worker index: the first pod
        else:
            secret = var["valueFrom"]["secretKeyRef"]
            assert secret.get("optional"), f"{var['name']}: a secret this test would have to make up"
    return env


def args_of(container: dict[str, Any], env: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), a) for a in container.get("args", [])]


@pytest.mark.parametrize("overlay", STARTED)
def test_the_pod_starts_with_the_kubelet_s_environment_and_gets_ready(overlay, start, tmp_path):
    objects = render(overlay)
    _, container = pod_of(objects)
    token = tmp_path / "token"
    token.write_text("a-token-from-the-secret\n")
    env = kubelet_env(objects, container, {})
    for name, path in (("SUPERVISOR_ADMIN_TOKEN_FILE", str(token)), ("SUPERVISOR_LOG_DIR", str(tmp_path / "logs"))):
        if name in env:
            env[name] = path  # the secret's and the emptyDir's mounts, here
    args = args_of(container, env)
    model, child = args[args.index("--") + 1], args[args.index("--") + 2:]
    run = start(2, *child, model=model, env=env, options=["--min-ready-ranks", "2", *args[:args.index("--")]])
    run.wait_ready()
    out = run.output()
    assert "removed from the environment before reading it" in out and "VLLM_PORT" in out, out[-2000:]
    ranks = psutil.Process(run.rank_pid(0)).environ()  # what a rank (vLLM, here the stand-in) was given
    assert "VLLM_PORT" not in ranks and "VLLM_SERVICE_HOST" not in ranks
    assert ranks.get("LLM_PORT", "").startswith("tcp://")  # the shipped Service's links: nothing reads them
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-2000:]


@pytest.mark.parametrize("overlay", DRY_RUN)
def test_a_data_parallel_pod_accepts_the_kubelet_s_environment(overlay, tmp_path):
    objects = render(overlay)
    _, container = pod_of(objects)
    env = kubelet_env(objects, container, LWS_ENV if overlay == "moe-dp-lws" else {})
    env.update(PATH="/usr/bin:/bin", TMPDIR=str(tmp_path), SUPERVISOR_LOG_DIR=str(tmp_path / "logs"))
    result = subprocess.run([sys.executable, "-m", "vllm_dp_supervisor", "--dry-run", "--server-cmd", STANDIN_CMD,
                             *args_of(container, env)], capture_output=True, text=True, timeout=60, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "removed_from_environment" in result.stdout and "VLLM_PORT" in result.stdout
