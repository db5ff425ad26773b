"""Ranks started with vLLM's --api-key: the supervisor authenticates like a client.

vLLM answers 401 on /v1/* without the key. The deep probe once sent none, took every 401 for a
hung engine, and stopped a healthy pod ~90 s after it was ready.
"""

from __future__ import annotations

import signal

import pytest
from harness import DEEP, metrics, standin_metric, wait_for

SECRET = "sk-test-key-4242"


@pytest.mark.parametrize("how", ["flag", "flag=", "several keys", "config file", "environment"])
def test_deep_probes_carry_the_ranks_api_key(start, tmp_path, how):
    child: list[str] = []
    env = {}
    if how == "flag":
        child = ["--api-key", SECRET]
    elif how == "flag=":
        child = [f"--api-key={SECRET}"]
    elif how == "several keys":
        child = ["--api-key", SECRET, "other-key"]
    elif how == "config file":
        config = tmp_path / "vllm.yaml"
        config.write_text(f"api-key: {SECRET}\n")
        child = ["--config", str(config), "--api-key", SECRET]  # the stand-in reads no YAML itself
    else:
        env = {"VLLM_API_KEY": SECRET}
    run = start(1, *child, options=DEEP, env=env)
    port = run.wait_ready()["ranks"][0]["port"]
    # five deep probes answered (each a one-token completion the stand-in counts only when authorized)
    wait_for(lambda: standin_metric(port, "standin_completions_total") >= 5, 15, "five authorized deep probes")
    status = run.status()
    assert status["ready"] and status["ranks"][0]["deep_probe_failures"] == 0
    assert standin_metric(port, "standin_unauthorized_total") == 0
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]
    assert SECRET not in run.output() and SECRET not in str(status)


def test_a_key_the_supervisor_cannot_know_is_a_configuration_error_not_a_hang(start):
    run = start(1, "--standin-require-key", "only-the-rank-knows", options=DEEP)
    port = run.wait_ready()["ranks"][0]["port"]
    wait_for(lambda: "refused the supervisor's deep probe" in run.output(), 10, "the credentials error")
    # well past the failure threshold (2) in deep-probe rounds: still ready, nothing counted
    wait_for(lambda: run.status()["ranks"][0]["consecutive_failures"] == 0 and
             standin_metric(port, "standin_unauthorized_total") >= 1, 5, "the refused probe")
    before = metrics(run)[("supervisor_probe_duration_seconds_count", (("rank", "0"),))]
    wait_for(lambda: metrics(run)[("supervisor_probe_duration_seconds_count", (("rank", "0"),))] >= before + 10,
             10, "ten more /health rounds (ten deep-probe intervals)")
    status = run.status()
    assert status["ready"] and status["ranks"][0]["state"] == "ready"
    assert status["ranks"][0]["deep_probe_failures"] == 0
    out = run.output()
    assert out.count("refused the supervisor's deep probe") == 1, out
    assert "HTTP 401" in out and "not counted as a rank failure" in out.lower()
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]
