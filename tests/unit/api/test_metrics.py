"""api/metrics.py: the series read off the published view at scrape time."""

from __future__ import annotations

import time

from harness import samples_of

from vllm_dp_supervisor.api.metrics import PodMetrics, StateCollector
from vllm_dp_supervisor.core.snapshot import PodView, RankView, Snapshots
from vllm_dp_supervisor.core.states import RankState, SupervisorState


def scrape(*ranks: RankView, startup_timeout: float | None = 1800.0) -> dict:
    metrics = PodMetrics(len(ranks), startup_timeout=startup_timeout)
    metrics.register(StateCollector(Snapshots(PodView(0, SupervisorState.RUNNING, False, 1, ranks))))
    return samples_of(metrics.render().decode())


def test_a_rank_is_said_to_be_starting_only_while_it_starts():
    """An alert on a slow start must stop by itself once the rank is ready: the series is gone then."""
    started = time.monotonic() - 120
    got = scrape(RankView(0, 8000, 10, RankState.STARTING, 0, 0, None, started),
                 RankView(1, 8001, 11, RankState.READY, 0, 0, 42.0, started))
    assert 120 <= got[("supervisor_rank_starting_seconds", (("rank", "0"),))] < 120 + 60
    assert ("supervisor_rank_starting_seconds", (("rank", "1"),)) not in got
    assert got[("supervisor_rank_start_to_ready_seconds", (("rank", "1"),))] == 42.0
    assert got[("supervisor_startup_timeout_seconds", ())] == 1800.0


def test_a_rank_not_yet_spawned_has_no_start_time_and_no_timeout_is_no_series():
    got = scrape(RankView(0, 8000, None, RankState.STARTING, 0, 0), startup_timeout=None)
    assert not any(name in ("supervisor_rank_starting_seconds", "supervisor_startup_timeout_seconds")
                   for name, _ in got)
