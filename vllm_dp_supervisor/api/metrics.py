"""Prometheus metrics, one registry per supervisor, built by the composition root.

What can be read off the state machine (rank states, ready, stopping, time to ready) is read at
scrape time from the published view (`StateCollector`), so there is no second copy of the state
to keep in step; counters and the probe histogram are bumped by the machine through the core's
`Counters` port, which `PodMetrics` implements.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from vllm_dp_supervisor.core.snapshot import Snapshots
from vllm_dp_supervisor.core.states import RankState
from vllm_dp_supervisor.settings.config import package_version

# No `_created` series: they double the output and nobody graphs them.
disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PROBE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class StateCollector(Collector):
    """The published view's series, read at scrape time."""
    def __init__(self, snapshots: Snapshots) -> None:
        self._snapshots = snapshots

    def collect(self) -> Iterator[GaugeMetricFamily]:
        view = self._snapshots.current  # one view: every series of a scrape agrees with the others
        now = time.monotonic()
        state = GaugeMetricFamily("supervisor_rank_state", "1 for the rank's current state", labels=["rank", "state"])
        ready_after = GaugeMetricFamily("supervisor_rank_start_to_ready_seconds",
                                        "seconds from a rank's start to its first 200 from /health", labels=["rank"])
        # Only while the rank starts: an alert on it stops by itself once the rank is ready (the
        # start-to-ready gauge above keeps its value for good, so it cannot say "still loading").
        starting = GaugeMetricFamily("supervisor_rank_starting_seconds",
                                     "seconds the rank's current attempt has been starting; only while it starts",
                                     labels=["rank"])
        for rank in view.ranks:
            for s in RankState:
                state.add_metric([str(rank.rank), s.value], 1.0 if rank.state is s else 0.0)
            if rank.ready_after_s is not None:
                ready_after.add_metric([str(rank.rank)], round(rank.ready_after_s, 3))
            if rank.state is RankState.STARTING and rank.started_monotonic is not None:
                starting.add_metric([str(rank.rank)], round(max(0.0, now - rank.started_monotonic), 3))
        yield state
        yield ready_after
        yield starting
        yield GaugeMetricFamily("supervisor_ready", "1 while /ready answers 200", value=1.0 if view.ready else 0.0)
        yield GaugeMetricFamily("supervisor_stopping", "1 once a stop is under way",
                                value=0.0 if view.live else 1.0)


class PodMetrics:
    """The registry and the counters the machine bumps (core.ports.Counters)."""

    def __init__(self, ranks: int, mode: str = "replicas", startup_timeout: float | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # the supervisor process's own CPU, memory, open files (process_*), Python's (python_*)
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        Info("supervisor_build", "the supervisor's version and mode", registry=self.registry).info(
            {"version": package_version(), "mode": mode})
        if startup_timeout is not None:  # what an alert on a slow start measures against
            Gauge("supervisor_startup_timeout_seconds", "--startup-timeout: how long a rank may take to be ready",
                  registry=self.registry).set(startup_timeout)
        self.rank_series_skipped = Counter(
            "supervisor_rank_metrics_skipped", "a rank's own vllm:* series left out of a scrape of /metrics, by "
            "reason: timeout, refused, status, error, too_large", ["rank", "reason"], registry=self.registry)
        self.restarts = Counter("supervisor_rank_restarts", "restarts of a rank", ["rank"], registry=self.registry)
        self.exits = Counter("supervisor_rank_exits", "exits of a rank's server process by reason",
                             ["rank", "reason"], registry=self.registry)
        self.probe_duration = Histogram("supervisor_probe_duration_seconds", "/health probe round trip",
                                        ["rank"], buckets=PROBE_BUCKETS, registry=self.registry)
        self.probe_failures = Counter("supervisor_probe_failures", "failed /health probes of a ready rank, by reason",
                                      ["rank", "reason"], registry=self.registry)
        self.startup_probe_failures = Counter(
            "supervisor_startup_probe_failures", "failed /health probes while a rank starts (refused while "
            "it loads is expected), by reason", ["rank", "reason"], registry=self.registry)
        self.deep_probe_failures = Counter(
            "supervisor_deep_probe_failures", "failed one-token completions to a ready rank (the deep probe), "
            "by reason", ["rank", "reason"], registry=self.registry)
        for rank in range(ranks):  # present from the start, at 0, so rate() works on the first failure
            self.restarts.labels(str(rank))
            for reason in ("timeout", "refused", "status", "error"):
                self.probe_failures.labels(str(rank), reason)
                self.startup_probe_failures.labels(str(rank), reason)
                self.deep_probe_failures.labels(str(rank), reason)

    def register(self, collector: Collector) -> None:
        """Series read at scrape time (the published view's, the router's)."""
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- core.ports.Counters ----

    def restarted(self, rank: int) -> None:
        self.restarts.labels(str(rank)).inc()

    def exited(self, rank: int, reason: str) -> None:
        self.exits.labels(str(rank), reason).inc()

    def probed(self, rank: int, seconds: float, failure: str | None, starting: bool) -> None:
        self.probe_duration.labels(str(rank)).observe(seconds)
        if failure is not None:
            (self.startup_probe_failures if starting else self.probe_failures).labels(str(rank), failure).inc()

    def deep_probe_failed(self, rank: int, reason: str) -> None:
        self.deep_probe_failures.labels(str(rank), reason).inc()

    def rank_metrics_skipped(self, rank: int, reason: str) -> None:
        """A rank's own series left out of a scrape (rank_metrics.py)."""
        self.rank_series_skipped.labels(str(rank), reason).inc()

