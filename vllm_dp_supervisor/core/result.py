"""How a run ended (`ExitResult`): the exit code, the failure that decided it, one row per rank;
the exit summary and the termination message are written from it. Reads records; writes nothing.

Deliberately no argv and no environment anywhere here: they carry API keys and tokens.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from vllm_dp_supervisor.core.records import Failure, RankRecord
from vllm_dp_supervisor.settings import exits

log = logging.getLogger("supervisor")
NO_ERROR_WORDS = "no error in its output"



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
        rows = tuple(RankRow(r.rank, r.current.process.pid, r.spec.port, r.current.exit_code, r.current.run_time_s(),
                             r.group.budget.total, r.current.outcome or r.state.value, r.current.last_error())
                     for r in records)
        if not failures:
            return cls(exits.REQUESTED, None, stop_reason, rows)
        first = min(failures, key=lambda f: f.at)
        failed = records[first.rank].current
        words = failed.last_error() if failed.failure_exited else None
        if failed.failure_exited and words is None and (failed.exit_code or 0) > 128:
            words = NO_ERROR_WORDS  # killed by a signal before it could say why: say so, guess nothing
        return cls(first.code, first, stop_reason, rows, words)

    def log_summary(self, log_dir: Path | None) -> None:
        log.info("%-4s %-8s %-6s %-5s %-9s %-8s %s", "rank", "pid", "port", "exit", "ran", "restarts", "outcome",
                 extra={"json_message": "exit summary", "fields": {"ranks": len(self.rows)}})
        for row in self.rows:  # a table in text; in JSON each row's fields as data
            fields = {"pid": row.pid, "port": row.port, "exit_code": row.exit_code,
                      "ran_s": None if row.ran_s is None else round(row.ran_s, 1), "restarts": row.restarts,
                      "outcome": row.outcome, "last_error": row.last_error}
            log.info("%-4d %-8s %-6d %-5s %-9s %-8d %s%s", row.rank, row.pid or "-", row.port,
                     "-" if row.exit_code is None else row.exit_code,
                     "-" if row.ran_s is None else f"{row.ran_s:.1f}s", row.restarts, row.outcome,
                     f"; last error: {row.last_error}" if row.last_error else "",
                     extra={"rank": row.rank, "fields": fields, "json_message": f"rank {row.rank}: {row.outcome}"})
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
