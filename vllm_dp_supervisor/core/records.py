"""What the supervisor knows of each rank: the rank itself (`RankRecord`: its spec and group, fixed
for the run) and its current process (`Attempt`: replaced whole at every restart), and how ranks
restart together (`RankGroup`). Plain data: only `machine.Machine` writes these fields.

A loop is started for one attempt and holds that `Attempt`: it reads its own attempt's state, never
the next one's, and every observation it reports carries the attempt's number, so the machine
drops what an older attempt's loop says (`Machine.report`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence

from vllm_dp_supervisor.core.ports import Process
from vllm_dp_supervisor.core.restarts import RestartBudget
from vllm_dp_supervisor.core.states import RankState
from vllm_dp_supervisor.settings.config import RestartRules
from vllm_dp_supervisor.settings.plan import RankSpec

log = logging.getLogger("supervisor")


@dataclasses.dataclass(frozen=True)
class Failure:
    """A reason to stop that was not asked for. The earliest one decides the exit code."""
    at: float  # monotonic
    rank: int
    code: int
    reason: str


class RefusedAction(Exception):
    """An operator action that cannot be done now (HTTP 409)."""


@dataclasses.dataclass(eq=False)
class Attempt:
    """One process of a rank, from its start until the next attempt replaces it, and what is
    known of it. A new attempt starts from these defaults: nothing of the last one carries over."""
    number: int  # 0 for the first process, one more at each restart
    process: Process
    state: RankState = RankState.STARTING
    consecutive_failures: int = 0
    deep_failures: int = 0
    last_probe_ms: float | None = None
    last_probe_error: str | None = None
    ready_after_s: float | None = None
    ready_since: float | None = None  # monotonic, while READY
    outcome: str | None = None
    exit_code: int | None = None
    ended_monotonic: float | None = None
    killed_by_supervisor: bool = False  # so its SIGKILL reads as ours, not a crash
    hung: bool = False  # declared hung: a graceful stop is futile (teardown.py)
    failure_reason: str | None = None  # set when it failed by itself, not by our stop
    # What it was declared while alive (verdicts.DECLARED: engine died, hung, ...): its exit, which
    # our stop then causes, is named for that, not as a planned stop
    declared: str | None = None
    # Its last error as it stood when it failed: what it printed while we stopped it is not why.
    failure_error: str | None = None
    failure_exited: bool = False  # failed by exiting (its last words explain it) or while alive
    next_restart_at: float | None = None  # wall clock, while in BACKOFF
    # Monotonic: until then, the router's stall reports are not judged again (it was judged
    # working a moment ago: one long prefill keeps it quiet for a while).
    vouched_until: float = 0.0
    judging: bool = False  # a stall of it is being judged (loops/judge.py): the next reports are the same stall
    restart_now: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # an operator cut the backoff
    probe_soon: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # the router saw trouble

    def run_time_s(self) -> float | None:
        start = self.process.started_monotonic
        if start is None:
            return None
        return (self.ended_monotonic or time.monotonic()) - start

    def last_error(self) -> str | None:
        """Why it failed, in its own words; None unless it failed by itself."""
        if not self.failure_reason:
            return None
        return self.failure_error or self.process.output.last_error()


class RankRecord:
    """One rank: its spec and group, fixed for the run, and its current attempt."""

    def __init__(self, spec: RankSpec, process: Process) -> None:
        self.spec = spec
        self.current = Attempt(0, process)
        self.group: RankGroup  # set by the group that takes it in (make_groups), before any use

    @property
    def rank(self) -> int:
        return self.spec.rank

    @property
    def attempt(self) -> int:
        """The current attempt's number."""
        return self.current.number

    @property
    def state(self) -> RankState:
        """The current attempt's state (a loop reads its own attempt's instead)."""
        return self.current.state

    @property
    def log(self) -> logging.LoggerAdapter:
        """The supervisor's logger, with the rank attached (a field of its own in JSON lines)."""
        return logging.LoggerAdapter(log, {"rank": self.spec.rank})

    def __repr__(self) -> str:
        return f"RankRecord(rank={self.rank}, attempt={self.attempt}, state={self.state.value})"


class RankGroup:
    """Ranks that fail, restart and recover as one, with one restart budget.

    In `replicas` mode each rank is a group of its own. In `dp` mode the local ranks are one group:
    their engines are coupled (a MoE step needs every rank), so one failure takes all of them down
    and back, and they share one budget (else ranks failing in turn would get ranks x
    --max-restarts restarts).
    """

    def __init__(self, records: Sequence[RankRecord], rules: RestartRules) -> None:
        self.records = list(records)
        self.budget = RestartBudget(rules)
        self.restarting = False  # a restart of the group is under way
        for record in self.records:
            record.group = self

    @property
    def ranks(self) -> list[int]:
        return [r.rank for r in self.records]


def make_groups(records: Sequence[RankRecord], rules: RestartRules, *, coupled: bool) -> list[RankGroup]:
    """One group of every rank when `coupled` (dp mode), else one group per rank."""
    if coupled:
        return [RankGroup(records, rules)]
    return [RankGroup([r], rules) for r in records]
