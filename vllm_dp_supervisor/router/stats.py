"""The router's counters as a worker keeps them: plain numbers, sent to the supervisor twice a
second (router_workers/collector.py sums them there and serves them on /metrics). No Prometheus client here: a
worker imports as little as it can."""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Mapping
from typing import Any

from vllm_dp_supervisor.router.protocol import StatsReport

# Seconds. From a loopback hop (~0.1 ms) to a long generation.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 120.0, 300.0)


# Seconds. The cache policy's work on one request: reading its prompt's blocks, choosing.
LOOKUP_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class Histogram:
    """Bucket counts (not cumulative) and a sum, for one label set."""
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.total += seconds


class WorkerStats:
    """One worker's counts since it started."""
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, str]] = Counter()  # (rank, code class, endpoint)
        self.retries: Counter[str] = Counter()  # by reason
        self.cut_streams: Counter[str] = Counter()  # by rank
        self.resumed: Counter[str] = Counter()  # by kind: "stream" (continued), "request" (sent again)
        self.resume_gap = Histogram()  # a stream's cut to its continuation's first byte out
        self.no_rank = 0  # 503: no rank became ready within --router-queue-timeout
        self.rejected: Counter[str] = Counter()  # requests refused before routing (4xx), by status
        self.ttfb: dict[str, Histogram] = {}
        self.duration: dict[str, Histogram] = {}
        self.chunks = 0  # pieces of answers relayed from the ranks (a stream's: about one a token)
        self.loop_lag = 0.0  # the most the worker's loop was late since the last report (seconds)

    def lagged(self, late: float) -> None:
        self.loop_lag = max(self.loop_lag, late)

    def observe(self, rank: int, status: int, endpoint: str, ttfb: float | None, duration: float) -> None:
        key = str(rank)
        self.requests[(key, f"{status // 100}xx", endpoint)] += 1
        if ttfb is not None:
            self.ttfb.setdefault(key, Histogram()).observe(ttfb)
        self.duration.setdefault(key, Histogram()).observe(duration)

    def report(self, inflight: Mapping[int, int], placed: Mapping[str, int] | None = None,
               cache: Mapping[str, Any] | None = None) -> StatsReport:
        """What the stats message carries. `placed`, `cache`: the policy's (policies.Policy.report)."""
        return {
            "cache": dict(cache or {}),
            "placed": dict(placed or {}),
            "requests": [[*k, n] for k, n in self.requests.items()],
            "retries": dict(self.retries),
            "cut_streams": dict(self.cut_streams),
            "resumed": dict(self.resumed),
            "resume_gap": [self.resume_gap.counts, self.resume_gap.total],
            "no_rank": self.no_rank,
            "rejected": dict(self.rejected),
            "ttfb": {k: [h.counts, h.total] for k, h in self.ttfb.items()},
            "duration": {k: [h.counts, h.total] for k, h in self.duration.items()},
            "inflight": {str(k): n for k, n in inflight.items() if n},
            "chunks": self.chunks,
            "loop_lag": self._lag_taken(),
        }

    def _lag_taken(self) -> float:
        lag, self.loop_lag = self.loop_lag, 0.0
        return lag
