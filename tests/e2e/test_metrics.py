"""Every rank's vllm:* series on the supervisor's /metrics, fetched from stand-in ranks; the router's
/metrics is the same body, never a rank's."""

from __future__ import annotations

import os
import re
import signal

from harness import ROOT, metrics, request, samples_of

from vllm_dp_supervisor.settings.config import package_version

STANDIN = (("engine", "0"), ("model_name", "standin-model"))  # the stand-in's labels, as vLLM's


def test_the_supervisors_metrics_carry_every_ranks_vllm_series_and_skip_a_hung_one(start):
    run = start(2, options=["--probe-timeout", "0.5", "--probe-interval", "0.2", "--failure-threshold", "1000",
                            "--deep-probe-interval", "0", "--stall-timeout", "0"])
    status = run.wait_ready()
    got = metrics(run)
    for rank in ("0", "1"):
        assert got[("vllm:num_requests_running", (*STANDIN, ("rank", rank)))] == 0
        assert ("vllm:kv_cache_usage_perc", (*STANDIN, ("rank", rank))) in got
    assert got[("supervisor_build_info", (("mode", "replicas"), ("version", package_version())))] == 1
    assert got[("process_open_fds", ())] > 0
    readme = (ROOT / "docs" / "observability.md").read_text()
    exported = {re.sub(r"_(bucket|sum|count)$", "", name) for name, _ in got if not name.startswith(
        ("vllm:", "process_", "python_"))}
    assert exported and not [name for name in exported if f"`{name}`" not in readme]  # every series documented
    # a rank that does not answer in time is left out, and counted; the other is still there
    os.kill(status["ranks"][1]["pid"], signal.SIGSTOP)
    try:
        got = metrics(run)
        assert ("vllm:num_requests_running", (*STANDIN, ("rank", "0"))) in got
        assert not [k for k in got if k[0].startswith("vllm:") and ("rank", "1") in k[1]]
        assert got[("supervisor_rank_metrics_skipped_total", (("rank", "1"), ("reason", "timeout")))] == 1
    finally:
        os.kill(status["ranks"][1]["pid"], signal.SIGCONT)
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


def test_the_routers_metrics_are_the_pods_never_one_ranks(start):
    """vLLM's users scrape /metrics on the API port: every scrape there must see every rank."""
    run = start(2, "--api-key", "rank-k3y")
    run.wait_ready()
    for _ in range(4):  # proxied, these would be answered by ranks 0, 1, 0, 1
        status, headers, body = request(run, "GET", "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain") and "x-standin-rank" not in headers
        got = samples_of(body.decode())
        for rank in ("0", "1"):
            assert ("vllm:num_requests_running", (*STANDIN, ("rank", rank))) in got
        assert got[("supervisor_ready", ())] == 1
    status, headers, body = request(run, "HEAD", "/metrics")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


def test_rank_metrics_are_fetched_with_the_ranks_api_key(start):
    run = start(1, "--api-key", "rank-k3y", "--standin-guard-metrics")
    run.wait_ready()
    got = metrics(run)
    assert ("vllm:num_requests_running", (*STANDIN, ("rank", "0"))) in got
    assert not [k for k in got if k[0] == "supervisor_rank_metrics_skipped_total"]
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]
