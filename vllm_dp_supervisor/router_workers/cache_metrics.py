"""The cache policy's series on the supervisor's /metrics, from the workers' reports
(kvcache.CacheRouting.report, in stats.py's message): counters summed over workers (and those
that ended), gauges from the workers running (the blocks an index holds: the largest; whether
events are read and the tokenizer loaded: 1 only if every worker says so).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from vllm_dp_supervisor.router.stats import LOOKUP_BUCKETS

# per-rank counters: report key → (series, help)
RANK_COUNTERS = {
    "batches": ("supervisor_router_cache_event_batches", "KV event batches read from the rank's engines"),
    "events": ("supervisor_router_cache_events", "KV events read from the rank's engines"),
    "unreadable": ("supervisor_router_cache_events_dropped", "KV events or batches that could not be read"),
    "skipped": ("supervisor_router_cache_blocks_skipped", "stored blocks not indexed: their parent was "
                "unknown (events missed) or they were of another medium"),
    "gaps": ("supervisor_router_cache_sequence_gaps", "gaps in the rank's event sequence numbers"),
    "repaired": ("supervisor_router_cache_gaps_repaired", "gaps filled from the rank's replay endpoint"),
    "routed": ("supervisor_router_cache_routed", "requests placed on the rank by its cache"),
    "predicted_hit_tokens": ("supervisor_router_cache_predicted_hit_tokens", "prompt tokens the router "
                             "expected the rank's prefix cache to hit (compare vllm:prefix_cache_hits)"),
    "recalled": ("supervisor_router_cache_recalled", "requests placed on the rank because the router sent "
                 "their prefix there last, though its cache held less of it (evicted, or events not in yet)"),
    "checked": ("supervisor_router_cache_checked", "requests placed on the rank by its cache whose answer said "
                "how many prompt tokens its prefix cache hit (vLLM's --enable-prompt-tokens-details)"),
    "over_credited": ("supervisor_router_cache_over_credited", "checked requests the router credited with more "
                      "cached tokens than the rank's engine hit (a stale index)"),
    "over_credited_tokens": ("supervisor_router_cache_over_credited_tokens", "prompt tokens the router credited "
                             "to the rank's cache that its engine did not hit, over the checked requests"),
    "under_credited_tokens": ("supervisor_router_cache_under_credited_tokens", "prompt tokens the rank's engine "
                              "hit that the router did not credit (events not in yet, a prefix being computed)"),
}


def empty() -> dict[str, Any]:
    return {"ranks": {}, "fallbacks": {}, "lookup": [[0] * (len(LOOKUP_BUCKETS) + 1), 0.0]}


def add(into: dict[str, Any], report: Mapping[str, Any]) -> None:
    """Sum one worker's cache counters into `into` (shaped as `empty()`)."""
    for reason, n in report.get("fallbacks", {}).items():
        into["fallbacks"][reason] = into["fallbacks"].get(reason, 0) + n
    for rank, counts in report.get("ranks", {}).items():
        have = into["ranks"].setdefault(rank, {"drops": {}})
        for name in RANK_COUNTERS:
            have[name] = have.get(name, 0) + counts.get(name, 0)
        for why, n in counts.get("drops", {}).items():
            have["drops"][why] = have["drops"].get(why, 0) + n
    lookup = report.get("lookup")
    if lookup:
        into["lookup"] = [[a + b for a, b in zip(into["lookup"][0], lookup[0], strict=True)],
                          into["lookup"][1] + lookup[1]]


def families(summed: Mapping[str, Any], running: Iterable[Mapping[str, Any]],
             cumulative: Any) -> Iterator[Any]:
    """`running`: the cache reports of the workers running; `cumulative`: bucket counts → the
    cumulative buckets Prometheus takes."""
    reports = [r for r in running if r]
    if not reports and not summed["ranks"]:
        return  # not the cache policy
    blocks = GaugeMetricFamily("supervisor_router_cache_blocks", "blocks the router's index holds for the "
                               "rank's current engine (the largest over workers)", labels=["rank"])
    trusted = GaugeMetricFamily("supervisor_router_cache_events_read", "1 while every worker reads the rank's "
                                "KV events (0: it is placed by load)", labels=["rank"])
    for rank in sorted({k for r in reports for k in r.get("ranks", {})}, key=int):
        mine = [r["ranks"][rank] for r in reports if rank in r.get("ranks", {})]
        blocks.add_metric([rank], max(m.get("blocks", 0) for m in mine))
        trusted.add_metric([rank], min(m.get("trusted", 0) for m in mine))
    yield blocks
    yield trusted
    yield GaugeMetricFamily("supervisor_router_cache_tokenizer_loaded", "1 when every worker has the model's "
                            "tokenizer and chat template (0: requests are placed by load)",
                            value=min((r.get("tokenizer", 0) for r in reports), default=0))
    for name, (series, doc) in RANK_COUNTERS.items():
        family = CounterMetricFamily(series, doc, labels=["rank"])
        for rank, counts in sorted(summed["ranks"].items(), key=lambda kv: int(kv[0])):
            family.add_metric([rank], counts.get(name, 0))
        yield family
    drops = CounterMetricFamily("supervisor_router_cache_index_drops", "a rank's index dropped, by reason: "
                                "its engine ended (a restart, a stop), restarted within its attempt, or a gap "
                                "in its events could not be repaired", labels=["rank", "reason"])
    for rank, counts in sorted(summed["ranks"].items(), key=lambda kv: int(kv[0])):
        for why, n in sorted(counts["drops"].items()):
            drops.add_metric([rank, why], n)
    yield drops
    fallbacks = CounterMetricFamily("supervisor_router_cache_fallbacks", "requests the cache policy placed by "
                                    "load instead, by reason", labels=["reason"])
    for reason, n in sorted(summed["fallbacks"].items()):
        fallbacks.add_metric([reason], n)
    yield fallbacks
    lookup = HistogramMetricFamily("supervisor_router_cache_lookup_seconds", "the cache policy's work on one "
                                   "request: its prompt read as far as a rank holds it, the choice")
    lookup.add_metric([], cumulative(summed["lookup"][0], LOOKUP_BUCKETS), summed["lookup"][1])
    yield lookup
