"""router_workers/cache_metrics.py: the cache policy's counters summed over workers and kept when one ends;
its gauges from the workers running only."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vllm_dp_supervisor.router.stats import LOOKUP_BUCKETS, Histogram, WorkerStats
from vllm_dp_supervisor.router_workers.collector import RouterStats


def cache_report(blocks: int, trusted: int, events: int, hits: int, fallbacks: int,
                 looked: float | None = None) -> dict:
    rank = {"blocks": blocks, "trusted": trusted, "batches": events, "events": events, "unreadable": 0, "gaps": 1,
            "repaired": 1, "drops": {"engine ended": 1}, "skipped": 0, "routed": 2, "predicted_hit_tokens": hits}
    lookup = Histogram(LOOKUP_BUCKETS)  # as the cache policy times its placements (router/policies/cache.py)
    if looked is not None:
        lookup.observe(looked)
    return {"ranks": {"0": rank}, "fallbacks": {"no tokenizer": fallbacks}, "tokenizer": 1,
            "lookup": [lookup.counts, lookup.total]}


def samples(stats: RouterStats) -> dict:
    registry = CollectorRegistry()
    registry.register(stats)
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_cache_counters_are_summed_and_survive_a_worker_s_end_its_gauges_do_not():
    a, b = WorkerStats(), WorkerStats()
    stats = RouterStats()
    stats.report(0, json.loads(json.dumps(a.report({}, None, cache_report(10, 1, 5, 128, 1, looked=0.0003)))))
    stats.report(1, json.loads(json.dumps(b.report({}, None, cache_report(12, 0, 6, 256, 2)))))
    got = samples(stats)
    rank0 = (("rank", "0"),)
    assert got[("supervisor_router_cache_blocks", rank0)] == 12  # the largest over workers
    assert got[("supervisor_router_cache_events_read", rank0)] == 0  # 1 only if every worker reads them
    assert got[("supervisor_router_cache_predicted_hit_tokens_total", rank0)] == 384
    assert got[("supervisor_router_cache_index_drops_total", (("rank", "0"), ("reason", "engine ended")))] == 2
    assert got[("supervisor_router_cache_fallbacks_total", (("reason", "no tokenizer"),))] == 3
    assert got[("supervisor_router_cache_lookup_seconds_bucket", (("le", "0.0005"),))] == 1
    stats.retire(1)
    got = samples(stats)
    assert got[("supervisor_router_cache_predicted_hit_tokens_total", rank0)] == 384
    assert got[("supervisor_router_cache_blocks", rank0)] == 10
    assert got[("supervisor_router_cache_events_read", rank0)] == 1


def test_without_the_cache_policy_there_are_no_cache_series():
    stats = RouterStats()
    stats.report(0, json.loads(json.dumps(WorkerStats().report({}))))
    assert not [k for k in samples(stats) if k[0].startswith("supervisor_router_cache")]
