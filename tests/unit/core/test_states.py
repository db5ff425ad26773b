"""core/states.py: the edges, each with a reason, and the named sets. Pure, fast."""

from __future__ import annotations

import pytest

from vllm_dp_supervisor.core.states import (
    ALIVE,
    PROBED,
    RANK_TRANSITIONS,
    SERVING,
    InvalidTransition,
    RankState,
    SupervisorState,
    check_rank_transition,
    check_supervisor_transition,
)


def test_every_state_has_an_entry_and_only_a_restart_leaves_exited():
    assert set(RANK_TRANSITIONS) == set(RankState)
    assert RANK_TRANSITIONS[RankState.EXITED] == frozenset({RankState.BACKOFF})
    assert RANK_TRANSITIONS[RankState.BACKOFF] == frozenset({RankState.STARTING, RankState.EXITED})


def test_every_live_state_can_exit_and_only_starting_recovery_or_a_judgment_becomes_ready():
    for state in (*ALIVE, RankState.STOPPING):
        check_rank_transition(state, RankState.EXITED)
    assert [s for s in RankState if RankState.READY in RANK_TRANSITIONS[s]] == \
        [RankState.STARTING, RankState.RECOVERING, RankState.STALLED]
    # only a serving rank is drained or judged, and neither goes back to serving by itself
    assert [s for s in RankState if RankState.DRAINING in RANK_TRANSITIONS[s]] == [RankState.READY]
    assert [s for s in RankState if RankState.STALLED in RANK_TRANSITIONS[s]] == [RankState.READY]
    assert RankState.READY not in RANK_TRANSITIONS[RankState.DRAINING]
    # only a ready rank enters a recovery, and a recovery ends ready, failed, stopped or dead
    assert [s for s in RankState if RankState.RECOVERING in RANK_TRANSITIONS[s]] == [RankState.READY]
    # a new process only ever starts after the old tree is gone and the backoff state was entered
    assert [s for s in RankState if RankState.STARTING in RANK_TRANSITIONS[s]] == [RankState.BACKOFF]


@pytest.mark.parametrize("old,new", [(RankState.EXITED, RankState.READY), (RankState.STOPPING, RankState.READY),
                                     (RankState.UNHEALTHY, RankState.READY)])
def test_forbidden_rank_edges_raise(old, new):
    with pytest.raises(InvalidTransition):
        check_rank_transition(old, new)


def test_named_state_sets():
    assert {RankState.READY} == SERVING and SERVING <= PROBED <= ALIVE
    assert RankState.RECOVERING in PROBED and RankState.RECOVERING not in SERVING
    assert RankState.STOPPING not in ALIVE and RankState.UNHEALTHY not in PROBED


def test_supervisor_goes_one_way():
    check_supervisor_transition(SupervisorState.RUNNING, SupervisorState.STOPPING)
    check_supervisor_transition(SupervisorState.STOPPING, SupervisorState.STOPPED)
    with pytest.raises(InvalidTransition):
        check_supervisor_transition(SupervisorState.STOPPED, SupervisorState.RUNNING)
    with pytest.raises(InvalidTransition):
        check_supervisor_transition(SupervisorState.RUNNING, SupervisorState.STOPPED)
