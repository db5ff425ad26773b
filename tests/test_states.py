"""states.py and linux.describe_exit. Pure, fast."""

from __future__ import annotations

import signal

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
from vllm_dp_supervisor.procs.linux import describe_exit, exit_code


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


@pytest.mark.parametrize("returncode,text,code", [
    (0, "exited with code 0", 0), (3, "exited with code 3", 3),
    (-signal.SIGKILL, "killed by SIGKILL (out of memory?)", 137),
    (-signal.SIGSEGV, "killed by SIGSEGV", 139), (-signal.SIGTERM, "killed by SIGTERM", 143),
])
def test_exit_descriptions_and_codes(returncode, text, code):
    assert describe_exit(returncode) == text
    assert exit_code(returncode) == code
