"""snapshot.py: the frozen, versioned view the API and the router read. Pure, fast."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from vllm_dp_supervisor.core.snapshot import PodView, RankView, Snapshots
from vllm_dp_supervisor.core.states import RankState, SupervisorState


def view(*states: RankState, draining: bool = False, quorum: int = 2,
         state: SupervisorState = SupervisorState.RUNNING) -> PodView:
    return PodView(0, state, draining, quorum,
                   tuple(RankView(i, 8000 + i, 100 + i, s, 0, 0) for i, s in enumerate(states)))


def test_ready_follows_the_serving_ranks_the_quorum_drain_and_stop():
    assert view(RankState.READY, RankState.READY).ready
    assert not view(RankState.READY, RankState.RECOVERING).ready
    assert view(RankState.READY, RankState.BACKOFF, quorum=1).ready
    assert not view(RankState.READY, RankState.READY, draining=True).ready
    stopping = view(RankState.READY, RankState.READY, state=SupervisorState.STOPPING)
    assert not stopping.ready and not stopping.live and not stopping.rank_ready(0)
    v = view(RankState.READY, RankState.STARTING)
    assert v.rank_ready(0) and not v.rank_ready(1) and v.ready_ranks == 1
    assert v.not_ready() == [{"rank": 1, "state": "starting"}]


def test_a_view_cannot_be_changed_once_published():
    snapshots = Snapshots(view(RankState.STARTING))
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshots.current.draining = True  # type: ignore[misc]


def test_versions_grow_by_one_and_a_reader_is_woken_by_the_next():
    async def scenario() -> None:
        snapshots = Snapshots(view(RankState.STARTING))
        assert snapshots.current.version == 1
        assert (await snapshots.next(0)).version == 1  # one newer exists already: at once
        waiter = asyncio.ensure_future(snapshots.next(1))
        await asyncio.sleep(0)
        assert not waiter.done()
        published = snapshots.publish(view(RankState.READY))
        assert published.version == 2 and (await waiter) is published
        for _ in range(3):
            snapshots.publish(view(RankState.READY))
        assert snapshots.current.version == 5
    asyncio.run(scenario())
