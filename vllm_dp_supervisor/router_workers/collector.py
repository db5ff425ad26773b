"""The router's counters on the supervisor's /metrics: the latest report of each worker
(stats.py), summed. A worker that ends has its last report folded into `retired`, so a counter
never goes backwards when a worker restarts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from vllm_dp_supervisor.router.stats import LATENCY_BUCKETS
from vllm_dp_supervisor.router_workers import cache_metrics


def _add(into: dict[str, Any], report: Mapping[str, Any]) -> None:
    """Sum one worker's report into `into` (same shape)."""
    for rank, code, endpoint, n in report.get("requests", []):
        key = (rank, code, endpoint)
        into["requests"][key] = into["requests"].get(key, 0) + n
    for name in ("retries", "cut_streams", "rejected", "placed", "resumed"):
        for k, n in report.get(name, {}).items():
            into[name][k] = into[name].get(k, 0) + n
    into["no_rank"] += report.get("no_rank", 0)
    into["chunks"] += report.get("chunks", 0)
    gap = report.get("resume_gap")
    if gap:
        counts, total = gap
        into["resume_gap"] = [[a + b for a, b in zip(into["resume_gap"][0], counts, strict=True)],
                              into["resume_gap"][1] + total]
    cache_metrics.add(into["cache"], report.get("cache", {}))
    for name in ("ttfb", "duration"):
        for k, (counts, total) in report.get(name, {}).items():
            have = into[name].setdefault(k, [[0] * len(counts), 0.0])
            have[0] = [a + b for a, b in zip(have[0], counts, strict=True)]
            have[1] += total


def _empty() -> dict[str, Any]:
    return {"requests": {}, "retries": {}, "cut_streams": {}, "rejected": {}, "placed": {}, "resumed": {}, "no_rank": 0,
            "chunks": 0,
            "resume_gap": [[0] * (len(LATENCY_BUCKETS) + 1), 0.0], "ttfb": {}, "duration": {},
            "cache": cache_metrics.empty()}


class RouterStats(Collector):
    """The latest report of each worker, plus what workers that ended had counted."""
    def __init__(self) -> None:
        self.latest: dict[int, Mapping[str, Any]] = {}  # by worker slot
        self.retired = _empty()
        self.worker_restarts = 0
        self.workers_running = 0
        self._lag: dict[int, float] = {}  # by worker slot: its loop's worst lateness since the last scrape

    def report(self, slot: int, message: Mapping[str, Any]) -> None:
        self.latest[slot] = message
        # the worst since the last scrape, not since the last report (half a second): a scrape
        # every 15 s would see 3% of the time otherwise
        self._lag[slot] = max(self._lag.get(slot, 0.0), float(message.get("loop_lag", 0.0)))

    def retire(self, slot: int) -> None:
        """The worker in `slot` ended: its last counts stay, its in-flight requests do not."""
        self._lag.pop(slot, None)
        last = self.latest.pop(slot, None)
        if last is not None:
            _add(self.retired, last)

    def inflight(self) -> dict[int, int]:
        total: Counter[int] = Counter()
        for message in self.latest.values():
            for rank, n in message.get("inflight", {}).items():
                total[int(rank)] += n
        return dict(total)

    def totals(self) -> dict[str, Any]:
        summed = _empty()
        _add(summed, _as_report(self.retired))
        for message in self.latest.values():
            _add(summed, message)
        return summed

    def collect(self) -> Iterator[Any]:
        t = self.totals()
        requests = CounterMetricFamily("supervisor_router_requests", "requests the router answered, by rank, "
                                       "status class and endpoint family", labels=["rank", "code", "endpoint"])
        for (rank, code, endpoint), n in sorted(t["requests"].items()):
            requests.add_metric([rank, code, endpoint], n)
        yield requests
        inflight = GaugeMetricFamily("supervisor_router_inflight_requests", "requests in flight, by rank",
                                     labels=["rank"])
        for rank, n in sorted(self.inflight().items()):
            inflight.add_metric([str(rank)], n)
        yield inflight
        for name, doc in (("ttfb", ("supervisor_router_time_to_first_byte_seconds",
                                    "from a request's last byte in to its answer's first byte out")),
                          ("duration", ("supervisor_router_request_duration_seconds",
                                        "from a request's last byte in to its answer's last byte out"))):
            family = HistogramMetricFamily(*doc, labels=["rank"])
            for rank, (counts, total) in sorted(t[name].items()):
                family.add_metric([rank], _cumulative(counts), total)
            yield family
        retries = CounterMetricFamily("supervisor_router_retries", "requests sent to another rank, by reason",
                                      labels=["reason"])
        for reason, n in sorted(t["retries"].items()):
            retries.add_metric([reason], n)
        yield retries
        resumed = CounterMetricFamily("supervisor_router_resumed", "answers whose rank failed and that went on "
                                      "elsewhere, by kind: stream (a stream continued on another rank from its "
                                      "tokens), request (sent again whole: nothing had reached the client)",
                                      labels=["kind"])
        for kind, n in sorted(t["resumed"].items()):
            resumed.add_metric([kind], n)
        yield resumed
        gap = HistogramMetricFamily("supervisor_router_resume_gap_seconds", "a continued stream's cut to the "
                                    "continuation's first byte out")
        gap.add_metric([], _cumulative(t["resume_gap"][0]), t["resume_gap"][1])
        yield gap
        cut = CounterMetricFamily("supervisor_router_cut_streams", "answers cut because their rank failed "
                                  "after the first byte went out and they could not go on elsewhere, by rank",
                                  labels=["rank"])
        for rank, n in sorted(t["cut_streams"].items()):
            cut.add_metric([rank], n)
        yield cut
        yield CounterMetricFamily("supervisor_router_no_ready_rank", "503s: no rank ready within "
                                  "--router-queue-timeout", value=t["no_rank"])
        rejected = CounterMetricFamily("supervisor_router_rejected", "requests refused before routing "
                                       "(malformed, too large, too slow), by status", labels=["code"])
        for code, n in sorted(t["rejected"].items()):
            rejected.add_metric([code], n)
        yield rejected
        placed = CounterMetricFamily("supervisor_router_affinity_placements", "prefix and session policies: "
                                     "requests placed on their key's first-choice rank (home) or passed on "
                                     "by --router-load-bound (spilled)", labels=["outcome"])
        for outcome, n in sorted(t["placed"].items()):
            placed.add_metric([outcome], n)
        yield placed
        yield from cache_metrics.families(t["cache"], [m.get("cache", {}) for m in self.latest.values()], _cumulative)
        yield CounterMetricFamily("supervisor_router_relayed_chunks", "pieces of answers relayed from the ranks "
                                  "to clients (a stream's: about one a token); its rate is the token path's load",
                                  value=t["chunks"])
        lag = GaugeMetricFamily("supervisor_router_worker_loop_lag_seconds", "the most a worker's event loop was "
                                "late since the last scrape: a saturated worker delays every request this much",
                                labels=["worker"])
        for slot in sorted(self.latest):
            lag.add_metric([str(slot)], self._lag.get(slot, 0.0))
            self._lag[slot] = 0.0
        yield lag
        yield GaugeMetricFamily("supervisor_router_workers", "router worker processes running",
                                value=self.workers_running)
        yield CounterMetricFamily("supervisor_router_worker_restarts", "router workers restarted after "
                                  "they died", value=self.worker_restarts)


def _as_report(summed: Mapping[str, Any]) -> dict[str, Any]:
    """A summed dict back in the shape of a worker's report."""
    return {**summed, "requests": [[*k, n] for k, n in summed["requests"].items()]}


def _cumulative(counts: list[int], bounds: tuple[float, ...] = LATENCY_BUCKETS) -> list[tuple[str, float]]:
    """Per-bucket counts as Prometheus's cumulative buckets."""
    cumulative, buckets = 0, list[tuple[str, float]]()
    for bound, n in zip((*bounds, float("inf")), counts, strict=True):
        cumulative += n
        buckets.append((_le(bound), cumulative))
    return buckets


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else f"{bound:g}"
