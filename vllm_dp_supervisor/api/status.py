"""GET /status's body (and SIGUSR1's log line): the published view's summary, and per rank what an
operator debugs with. Reads the machine's records and the router's readout; writes nothing.

Deliberately no argv and no environment anywhere here: they carry API keys and tokens.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from vllm_dp_supervisor.core.machine import Machine
from vllm_dp_supervisor.core.records import Attempt
from vllm_dp_supervisor.core.states import RankState

# What /status and /events say in place of the ranks' log lines to a reader not allowed them.
RANK_LOGS_HIDDEN = ("hidden: send 'Authorization: Bearer <admin token>', or start the supervisor with "
                    "--show-rank-logs all")


class RouterReadout(Protocol):
    """What /status shows of the router (router_workers/workers.py)."""
    def status(self) -> dict[str, Any]: ...
    def inflight(self) -> dict[int, int]: ...


def _starting_for(attempt: Attempt) -> float | None:
    start = attempt.process.started_monotonic
    if attempt.state is not RankState.STARTING or start is None:
        return None
    return round(time.monotonic() - start, 3)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def status(machine: Machine, router: RouterReadout | None, *, rank_logs: bool) -> dict[str, Any]:
    """`rank_logs`: include the ranks' own words (last_line, log_tail, last_error), which can carry
    client addresses and prompts; without them, every other field is the same."""
    view = machine.snapshots.current
    inflight = router.inflight() if router is not None else {}

    def words(value: Any) -> Any:
        return value if rank_logs else None

    def rank(r: Any) -> dict[str, Any]:
        a: Attempt = r.current
        output = a.process.output
        return {
            "rank": r.rank,
            "port": r.spec.port,
            "pid": a.process.pid,
            "state": a.state.value,
            "devices": r.spec.devices_text,
            "consecutive_failures": a.consecutive_failures,
            "deep_probe_failures": a.deep_failures,
            "last_probe_ms": _rounded(a.last_probe_ms),
            "last_probe_error": a.last_probe_error,
            "ready_after_s": _rounded(a.ready_after_s),
            "exit_code": a.exit_code,
            "outcome": a.outcome,
            "last_error": words(a.last_error()),
            "log_tail": words(list(output.stderr_tail) if a.failure_reason else None),
            "last_line": words(output.last_line),
            "started_at": a.process.started_at,
            "starting_for_s": _starting_for(a),
            "starting": a.process.starting_readout if a.state is RankState.STARTING else None,
            "recovering": a.state is RankState.RECOVERING,
            "restarts": r.group.budget.total,
            "attempt": a.number,
            "next_restart_at": a.next_restart_at,
            "log_dir": None if output.log_dir is None else str(output.log_dir),
            "inflight": inflight.get(r.rank, 0) if router is not None else None,
        }
    return {
        "ready": view.ready,
        "stopping": not view.live,
        "draining": view.draining,
        "state": view.state.value,
        "stop_reason": machine.stop_reason,
        "ready_ranks": view.ready_ranks,
        "min_ready_ranks": view.min_ready_ranks,
        "ranks": [rank(r) for r in machine.records],
        "router": router.status() if router is not None else None,
        # the last POST /rollout's progress (core/actions.RolloutProgress)
        "rollout": machine.rollout.readout() if machine.rollout is not None else None,
        "rank_logs": "shown" if rank_logs else RANK_LOGS_HIDDEN,
    }
