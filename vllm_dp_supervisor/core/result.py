"""What the supervisor tells people: `/status`'s body and the result of a run (`ExitResult`),
which the exit summary prints. Reads records; writes nothing.

Deliberately no argv and no environment anywhere here: they carry API keys and tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from vllm_dp_supervisor.core.records import Failure, RankRecord
from vllm_dp_supervisor.core.snapshot import PodView
from vllm_dp_supervisor.core.states import RankState
from vllm_dp_supervisor.settings import exits

log = logging.getLogger("supervisor")



def _starting_for(record: RankRecord) -> float | None:
    start = record.process.started_monotonic
    if record.state is not RankState.STARTING or start is None:
        return None
    return round(time.monotonic() - start, 3)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class RouterReadout(Protocol):
    def status(self) -> dict[str, Any]: ...
    def inflight(self) -> dict[int, int]: ...


# What /status and /events say in place of the ranks' log lines to a reader not allowed them.
RANK_LOGS_HIDDEN = ("hidden: send 'Authorization: Bearer <admin token>', or start the supervisor with "
                    "--show-rank-logs all")


def status(view: PodView, records: Sequence[RankRecord], stop_reason: str | None,
           router: RouterReadout | None = None, rollout: dict[str, Any] | None = None, *,
           rank_logs: bool = True) -> dict[str, Any]:
    """GET /status: the published view's summary, and per rank what an operator debugs with.
    `rank_logs`: include the ranks' own words (last_line, log_tail, last_error), which can carry
    client addresses and prompts; without them, every other field is the same."""
    inflight = router.inflight() if router is not None else {}

    def words(value: Any) -> Any:
        return value if rank_logs else None
    return {
        "ready": view.ready,
        "stopping": not view.live,
        "draining": view.draining,
        "state": view.state.value,
        "stop_reason": stop_reason,
        "ready_ranks": view.ready_ranks,
        "min_ready_ranks": view.min_ready_ranks,
        "ranks": [{
            "rank": r.rank,
            "port": r.spec.port,
            "pid": r.process.pid,
            "state": r.state.value,
            "devices": r.spec.devices_text,
            "consecutive_failures": r.consecutive_failures,
            "deep_probe_failures": r.deep_failures,
            "last_probe_ms": _rounded(r.last_probe_ms),
            "last_probe_error": r.last_probe_error,
            "ready_after_s": _rounded(r.ready_after_s),
            "exit_code": r.exit_code,
            "outcome": r.outcome,
            "last_error": words(r.last_error()),
            "log_tail": words(list(r.process.output.stderr_tail) if r.failure_reason else None),
            "last_line": words(r.process.output.last_line),
            "started_at": r.process.started_at,
            "starting_for_s": _starting_for(r),
            "recovering": r.state is RankState.RECOVERING,
            "restarts": r.group.budget.total,
            "attempt": r.attempt,
            "next_restart_at": r.next_restart_at,
            "log_dir": None if r.process.output.log_dir is None else str(r.process.output.log_dir),
            "inflight": inflight.get(r.rank, 0) if router is not None else None,
        } for r in records],
        "router": router.status() if router is not None else None,
        "rollout": rollout,  # the last POST /rollout's progress (actions.RolloutProgress)
        "rank_logs": "shown" if rank_logs else RANK_LOGS_HIDDEN,
    }


@dataclasses.dataclass(frozen=True)
class RankRow:
    """One line of the exit summary."""
    rank: int
    pid: int | None
    port: int
    exit_code: int | None
    ran_s: float | None
    restarts: int
    outcome: str
    last_error: str | None


@dataclasses.dataclass(frozen=True)
class ExitResult:
    """How a run ended: the code the process exits with, the failure that decided it (the
    earliest; None when the stop was asked for), and one row per rank."""
    code: int
    first_failure: Failure | None
    stop_reason: str | None
    rows: tuple[RankRow, ...]
    # The failed rank's own last words, when it failed by exiting (a hung rank's reason says it all).
    failure_error: str | None = None

    @classmethod
    def of(cls, records: Sequence[RankRecord], failures: Sequence[Failure], stop_reason: str | None) -> ExitResult:
        rows = tuple(RankRow(r.rank, r.process.pid, r.spec.port, r.exit_code, r.run_time_s(), r.group.budget.total,
                             r.outcome or r.state.value, r.last_error()) for r in records)
        if not failures:
            return cls(exits.REQUESTED, None, stop_reason, rows)
        first = min(failures, key=lambda f: f.at)
        failed = records[first.rank]
        return cls(first.code, first, stop_reason, rows, failed.last_error() if failed.failure_exited else None)

    def log_summary(self, log_dir: Path | None) -> None:
        log.info("%-4s %-8s %-6s %-5s %-9s %-8s %s", "rank", "pid", "port", "exit", "ran", "restarts", "outcome")
        for row in self.rows:
            log.info("%-4d %-8s %-6d %-5s %-9s %-8d %s%s", row.rank, row.pid or "-", row.port,
                     "-" if row.exit_code is None else row.exit_code,
                     "-" if row.ran_s is None else f"{row.ran_s:.1f}s", row.restarts, row.outcome,
                     f"; last error: {row.last_error}" if row.last_error else "", extra={"rank": row.rank})
        if log_dir is not None:
            log.info("rank logs: %s", log_dir)
        log.log(logging.INFO if self.first_failure is None else logging.ERROR, "%s", self.sentence())

    def sentence(self) -> str:
        """Why the run ended, in one line: the exit summary's last line, the termination message's first."""
        if self.first_failure is None:
            return f"exiting with code {self.code}: {self.stop_reason}"
        error = f" ({self.failure_error})" if self.failure_error else ""
        return f"exiting with code {self.code}: {self.first_failure.reason}{error}"

    def termination_message(self) -> str:
        """For the termination-message file: the sentence, then one line per rank."""
        lines = [self.sentence()]
        for row in self.rows:
            restarts = f"; restarted {row.restarts} time(s)" if row.restarts else ""
            lines.append(f"rank {row.rank}: {row.outcome}{restarts}")
        return "\n".join(lines) + "\n"
