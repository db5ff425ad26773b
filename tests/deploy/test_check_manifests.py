"""`vllm-dp-supervisor check-manifests`, run as a user runs it on a copy of the manifests: from
another directory, on a kustomization directory, a piped render, JSON; a drifted GPU count is
named; garbage is a clear error (exit 2), never a traceback."""

from __future__ import annotations

import json
import subprocess

import yaml
from deploy_check import BIN, render
from harness import ROOT

COMMAND = [str(BIN / "vllm-dp-supervisor"), "check-manifests"]


def check_manifests(*args: str, stdin: str | None = None, path: str | None = None, cwd=None):
    env = {"PATH": path if path is not None else f"{BIN}:/usr/bin:/bin", "HOME": str(cwd or ROOT)}
    return subprocess.run([*COMMAND, *args], input=stdin, capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)


def test_the_shipped_overlays_agree_read_from_a_directory(tmp_path):
    result = check_manifests(str(ROOT / "deploy" / "overlays" / "replicas"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "" and "0 disagreement(s)" in result.stderr and "1 workload(s)" in result.stderr


def test_a_drifted_gpu_count_is_named_and_exits_1(tmp_path):
    objects = render("replicas")
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    limits = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    limits["nvidia.com/gpu"] = 3  # the env still says 4 ranks
    result = check_manifests("-", stdin=yaml.safe_dump_all(objects), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "requests 3 GPUs, the supervisor needs 4 ranks x 1 = 4" in result.stdout, result.stdout


def test_service_links_that_would_kill_the_ranks_are_refused(tmp_path):
    """A Service named `vllm` gives a pod with service links VLLM_PORT=tcp://..., and vLLM dies on it.
    The shipped Services are named `llm` and `llm-supervisor`: their links (LLM_PORT, ...) are read
    by nothing, and a pod without enableServiceLinks: false is fine with them."""
    objects = render("replicas")
    del next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]["enableServiceLinks"]
    assert {o["metadata"]["name"] for o in objects if o["kind"] == "Service"} == {"llm", "llm-supervisor"}
    assert check_manifests("-", stdin=yaml.safe_dump_all(objects), cwd=tmp_path).returncode == 0
    objects += [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                 "spec": {"selector": {"app.kubernetes.io/name": "vllm"}, "ports": [{"port": port}]}}
                for name, port in (("vllm", 8000), ("vllm-supervisor", 9256))]  # the names they had
    result = check_manifests("-", stdin=yaml.safe_dump_all(objects), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Deployment/vllm: Service/vllm gives it VLLM_PORT=tcp://... (a Kubernetes service link), which vLLM " \
           "reads as its port and dies on: set enableServiceLinks: false in the pod spec" in result.stdout
    assert "Service/vllm-supervisor gives it VLLM_SUPERVISOR_PORT=tcp://..." in result.stdout
    objects.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "supervisor"},
                    "spec": {"ports": [{"port": 80}]}})
    result = check_manifests("-", stdin=yaml.safe_dump_all(objects), cwd=tmp_path)
    assert "Service/supervisor gives it SUPERVISOR_PORT=tcp://... (a Kubernetes service link), which the " \
           "supervisor reads as --port" in result.stdout


def test_json_and_a_kubectl_list_are_read(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": render("inference-pool")}))
    result = check_manifests(str(listed), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_sidecar_before_the_supervisor_is_not_taken_for_it(tmp_path):
    objects = render("replicas")
    pod = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    pod["containers"].insert(0, {"name": "log-shipper", "image": "fluent-bit", "args": ["--port", "1"]})
    result = check_manifests("-", stdin=yaml.safe_dump_all(objects), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path):
    cases = {
        "missing": (["/nonexistent/manifests.yaml"], None, "cannot read /nonexistent/manifests.yaml"),
        "not yaml": (["-"], "key: [unclosed\n", "not valid YAML"),
        "not objects": (["-"], "- 1\n- 2\n", "not a Kubernetes object"),
        "empty": (["-"], "", "no Kubernetes object in standard input"),
        "no workload": (["-"], "kind: ConfigMap\nmetadata: {name: x}\n", None),
        "broken object": (["-"], "kind: Deployment\nmetadata: {name: x}\n", "malformed object"),
    }
    for name, (args, stdin, message) in cases.items():
        result = check_manifests(*args, stdin=stdin, cwd=tmp_path)
        assert "Traceback" not in result.stderr, (name, result.stderr)
        if message is None:  # readable, but nothing to check: a disagreement, said
            assert result.returncode == 1 and "no Deployment, StatefulSet or LeaderWorkerSet" in result.stdout
        else:
            assert result.returncode == 2 and message in result.stderr, (name, result.stderr)


def test_a_directory_without_kubectl_says_how_else(tmp_path):
    result = check_manifests(str(ROOT / "deploy" / "overlays" / "replicas"), path="/nonexistent", cwd=tmp_path)
    assert result.returncode == 2 and "needs kubectl on PATH" in result.stderr, result.stderr
