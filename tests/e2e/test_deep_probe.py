"""The deep probe: an engine hung behind a healthy /health, caught by one-token completions."""

from __future__ import annotations

import signal

import psutil
from harness import DEEP, FAST, metrics, standin_metric, wait_for


def test_deep_probe_catches_an_engine_hung_behind_a_healthy_health(start):
    run = start(2, "--standin-hang-completions-after", "0.5", "--standin-ranks", "1", options=DEEP)
    run.wait_ready()
    assert run.wait_exit(15) == 3, run.output()[-4000:]
    out = run.output()
    assert "rank 1 hung: 2 one-token completions failed in a row (last: no answer in 0.3 s) while /health answered" \
        in out
    assert "rank 0 hung" not in out


def test_deep_probe_hang_is_replaced_under_a_restart_policy(start):
    run = start(1, "--standin-hang-completions-after", "0.5", options=[*DEEP, *FAST])
    first = run.wait_ready()["ranks"][0]["pid"]
    wait_for(lambda: run.status()["ranks"][0]["attempt"] >= 1 and run.status()["ranks"][0]["state"] == "ready",
             15, "the hung rank replaced")
    assert not psutil.pid_exists(first)
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


def test_deep_probe_is_skipped_while_tokens_flow(start):
    # completions would hang, but the token counters move: the engine is busy, not stuck
    run = start(1, "--standin-hang-completions-after", "0", "--standin-busy", options=DEEP)
    port = run.wait_ready()["ranks"][0]["port"]
    # each deep-probe round reads the counters (+100 a read): wait for eight rounds
    wait_for(lambda: standin_metric(port, "vllm:generation_tokens_total") >= 900, 10, "eight deep-probe rounds")
    assert run.status()["ranks"][0]["state"] == "ready"
    assert standin_metric(port, "standin_completions_total") == 0  # not one completion was sent
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


def test_deep_probe_off(start):
    run = start(1, "--standin-hang-completions-after", "0", options=[*DEEP[2:], "--deep-probe-interval", "0"])
    port = run.wait_ready()["ranks"][0]["port"]
    wait_for(lambda: metrics(run)[("supervisor_probe_duration_seconds_count", (("rank", "0"),))] >= 10, 10,
             "two seconds of /health probes (ten deep-probe intervals, were they on)")
    assert run.status()["ranks"][0]["state"] == "ready"
    assert standin_metric(port, "standin_completions_total") == 0
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]
