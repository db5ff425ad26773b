"""router_workers/collector.py and stats.py: the workers' counters, summed on the supervisor's /metrics."""

from __future__ import annotations

import json

from vllm_dp_supervisor.router.stats import WorkerStats
from vllm_dp_supervisor.router_workers.collector import RouterStats


def test_counters_summed_over_workers_never_go_backwards_when_one_restarts():
    a, b = WorkerStats(), WorkerStats()
    a.observe(0, 200, "chat", 0.001, 0.5)
    a.observe(1, 502, "chat", None, 0.01)
    b.observe(0, 200, "chat", 0.002, 0.7)
    a.retries["unreachable"] += 1
    stats = RouterStats()
    stats.report(0, json.loads(json.dumps(a.report({0: 2}))))
    stats.report(1, json.loads(json.dumps(b.report({0: 1, 1: 1}))))
    assert stats.inflight() == {0: 3, 1: 1}
    before = stats.totals()
    assert before["requests"][("0", "2xx", "chat")] == 2 and before["retries"] == {"unreachable": 1}
    stats.retire(0)  # worker 0 died: its counts stay, its in-flight requests go
    after = stats.totals()
    assert after["requests"] == before["requests"] and after["ttfb"] == before["ttfb"]
    assert stats.inflight() == {0: 1, 1: 1}
    stats.report(0, WorkerStats().report({}))  # its successor starts from zero
    assert stats.totals()["requests"] == before["requests"]
    text = "\n".join(str(m) for m in stats.collect())
    assert "supervisor_router_requests" in text and "supervisor_router_time_to_first_byte_seconds" in text


def test_relayed_chunks_are_summed_and_each_worker_s_loop_lag_is_its_worst_since_the_last_scrape():
    a, b = WorkerStats(), WorkerStats()
    a.chunks, b.chunks = 200, 50
    for late in (0.001, 0.25, 0.002):
        a.lagged(late)
    stats = RouterStats()
    stats.report(0, json.loads(json.dumps(a.report({}))))
    stats.report(1, json.loads(json.dumps(b.report({}))))
    families = {f.name: f for f in stats.collect()}
    assert families["supervisor_router_relayed_chunks"].samples[0].value == 250
    assert {s.labels["worker"]: s.value for s in families["supervisor_router_worker_loop_lag_seconds"].samples} \
        == {"0": 0.25, "1": 0.0}
    assert a.report({})["loop_lag"] == 0.0  # a report takes the worst: the next one starts again
    stats.retire(0)
    assert stats.totals()["chunks"] == 250  # a worker that ended keeps what it relayed

    later = WorkerStats()
    later.lagged(0.01)
    stats.report(1, json.loads(json.dumps(later.report({}))))
    stats.report(1, json.loads(json.dumps(WorkerStats().report({}))))  # a quiet half second after it
    families = {f.name: f for f in stats.collect()}
    assert {s.labels["worker"]: s.value for s in families["supervisor_router_worker_loop_lag_seconds"].samples} \
        == {"1": 0.01}  # the worst between two scrapes, not the last report's
    families = {f.name: f for f in stats.collect()}
    assert families["supervisor_router_worker_loop_lag_seconds"].samples[0].value == 0.0
