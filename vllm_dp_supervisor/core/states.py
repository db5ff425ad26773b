"""The states a rank and the supervisor move through, and the edges allowed between them.

Dependency-free on purpose: the API, the tests and the state machine all read these names, and
only `machine.Machine.change_state` moves a rank along an edge.
"""

from __future__ import annotations

import enum


class RankState(enum.Enum):
    STARTING = "starting"    # spawned; has not answered /health with 200 yet
    READY = "ready"          # answered 200; fewer than --failure-threshold probe failures in a row
    RECOVERING = "recovering"  # its group is in vLLM's in-engine recovery: alive, not serving
    DRAINING = "draining"    # a planned stop: out of the router's rotation, finishing its requests
    STALLED = "stalled"      # it holds requests, sends nothing back, its engine idle: out of rotation, judged
    UNHEALTHY = "unhealthy"  # alive but failing: threshold reached, or not ready by --startup-timeout
    STOPPING = "stopping"    # the stop signal went to its process group; waiting for it to exit
    EXITED = "exited"        # the rank's server process has exited (its tree is stopped separately)
    BACKOFF = "backoff"      # its tree is gone; waiting out the restart delay


class SupervisorState(enum.Enum):
    RUNNING = "running"      # ranks are starting or serving
    STOPPING = "stopping"    # a stop was requested or a rank failed; /ready and /live answer 503
    STOPPED = "stopped"      # every rank's process tree is gone


# Each edge says why it exists. Anything not listed is a bug in the caller, not a runtime event.
RANK_TRANSITIONS: dict[RankState, frozenset[RankState]] = {
    RankState.STARTING: frozenset({
        RankState.READY,      # first 200 from /health
        RankState.UNHEALTHY,  # --startup-timeout ran out
        RankState.STOPPING,   # stop requested while loading
        RankState.EXITED,     # died while loading (bad flag, OOM, ...)
    }),
    RankState.READY: frozenset({
        RankState.UNHEALTHY,  # --failure-threshold consecutive probe failures
        RankState.RECOVERING,  # /fault_tolerance/status reports a faulted engine in its group
        RankState.DRAINING,   # a planned restart (an operator's, a rollout's): its requests finish first
        RankState.STALLED,    # it holds requests, sends nothing back, and its engine does nothing
        RankState.STOPPING,   # stop requested, or its dp group restarts after a crash
        RankState.EXITED,     # died while serving
    }),
    RankState.STALLED: frozenset({
        RankState.READY,      # its engine works again, its tokens moved, or it answered: not hung
        RankState.UNHEALTHY,  # no work seen for a while: hung
        RankState.STOPPING,   # stop requested, or its group restarts
        RankState.EXITED,     # died while judged
    }),
    RankState.DRAINING: frozenset({
        RankState.STOPPING,   # the router has nothing in flight on it, or the stop budget ran out
        RankState.EXITED,     # died while draining
    }),
    RankState.RECOVERING: frozenset({
        RankState.READY,      # every engine of the group healthy again after the retry
        RankState.UNHEALTHY,  # the recovery failed or ran out of --ft-recovery-timeout
        RankState.STOPPING,   # stop requested, or its dp group restarts
        RankState.EXITED,     # died while recovering
    }),
    RankState.UNHEALTHY: frozenset({
        RankState.STOPPING,   # the supervisor stops a failing rank with everything else
        RankState.EXITED,     # died before the stop reached it
    }),
    RankState.STOPPING: frozenset({
        RankState.EXITED,     # exited after the signal, or was killed
    }),
    RankState.EXITED: frozenset({
        RankState.BACKOFF,    # the restart policy allows another attempt; its tree is gone
    }),
    RankState.BACKOFF: frozenset({
        RankState.STARTING,   # the delay ran out (or an operator cut it short): a new process
        RankState.EXITED,     # the supervisor stopped during the delay: it stays down
    }),
}

# Named sets, so a check says what it means rather than listing states.
# /health is asked
PROBED = frozenset({RankState.STARTING, RankState.READY, RankState.RECOVERING, RankState.STALLED})
# its process runs and has not been told to stop
ALIVE = PROBED | {RankState.UNHEALTHY, RankState.DRAINING}
SERVING = frozenset({RankState.READY})  # counts for /ready, takes traffic
# its engine runs and keeps what it cached (an unhealthy one is about to be stopped)
CACHING = PROBED | {RankState.DRAINING}

SUPERVISOR_TRANSITIONS: dict[SupervisorState, frozenset[SupervisorState]] = {
    SupervisorState.RUNNING: frozenset({SupervisorState.STOPPING}),  # signal, or a rank failed
    SupervisorState.STOPPING: frozenset({SupervisorState.STOPPED}),  # every tree verified gone
    SupervisorState.STOPPED: frozenset(),
}


class InvalidTransition(RuntimeError):
    pass


def check_rank_transition(old: RankState, new: RankState) -> None:
    if new not in RANK_TRANSITIONS[old]:
        raise InvalidTransition(f"rank cannot go from {old.value} to {new.value}")


def check_supervisor_transition(old: SupervisorState, new: SupervisorState) -> None:
    if new not in SUPERVISOR_TRANSITIONS[old]:
        raise InvalidTransition(f"supervisor cannot go from {old.value} to {new.value}")
