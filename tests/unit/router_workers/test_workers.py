"""router_workers/workers.py's pure part: the published view as a worker reads it, and a worker's
reports as the machine's observations."""

from __future__ import annotations

import json

from vllm_dp_supervisor.core.observations import Stalled, Unreachable
from vllm_dp_supervisor.core.snapshot import PodView, RankView
from vllm_dp_supervisor.core.states import RankState, SupervisorState
from vllm_dp_supervisor.router import protocol
from vllm_dp_supervisor.router_workers.workers import observation, view_message


def test_a_view_names_the_serving_ranks_and_every_engine_that_keeps_its_cache():
    view = PodView(7, SupervisorState.RUNNING, False, 1, (
        RankView(0, 8000, 10, RankState.READY, 2, 1), RankView(1, 8001, 11, RankState.DRAINING, 0, 0),
        RankView(2, 8002, None, RankState.BACKOFF, 3, 3), RankView(3, 8003, 12, RankState.UNHEALTHY, 1, 1)))
    assert protocol.read_view(json.loads(view_message(view))) == protocol.View(
        7, {0: (8000, 2)}, {0: (2, True), 1: (0, True), 2: (3, False), 3: (1, False)})


def test_a_worker_s_reports_become_the_machine_s_observations():
    assert observation(protocol.Unreachable(1, 4, "refused")) == Unreachable(1, 4, "refused")
    assert observation(protocol.Stalled(0, 2, 3.5, 5)) == Stalled(0, 2, 3.5, 5)
