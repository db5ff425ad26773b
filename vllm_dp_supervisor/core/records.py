"""What the supervisor knows of each rank (`RankRecord`) and how ranks restart together
(`RankGroup`). Plain data: only `machine.Machine` writes these fields.

A `RankSpec` (plan.py) is what a rank should be, fixed for the run; a `RankRecord` is what its
current attempt is doing. `attempt` grows by one with each new process, and every observation a
loop reports carries the attempt it was about: the machine drops the ones from an older attempt.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence

from vllm_dp_supervisor.core.restarts import RestartBudget, RestartRules
from vllm_dp_supervisor.core.states import RankState
from vllm_dp_supervisor.procs.process import RankProcess
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


@dataclasses.dataclass
class RankRecord:
    """One rank: its spec, its current process, and what is known of that attempt."""
    spec: RankSpec
    process: RankProcess
    group: RankGroup = dataclasses.field(init=False, repr=False)
    state: RankState = RankState.STARTING
    attempt: int = 0
    consecutive_failures: int = 0
    deep_failures: int = 0
    last_probe_ms: float | None = None
    last_probe_error: str | None = None
    ready_after_s: float | None = None
    ready_since: float | None = None  # monotonic, while READY
    outcome: str | None = None
    exit_code: int | None = None
    ended_monotonic: float | None = None
    killed_by_supervisor: bool = False
    hung: bool = False  # declared hung: a graceful stop is futile, it gets the short grace (teardown.py)
    failure_reason: str | None = None  # set when the rank failed by itself, not by our stop
    # Its last error as it stood when it failed: what it printed while we stopped it is not why.
    failure_error: str | None = None
    failure_exited: bool = False  # failed by exiting (its last words explain it) or while alive
    next_restart_at: float | None = None  # wall clock, while in BACKOFF
    # Monotonic: until then, the router's stall reports are not judged again (it was judged
    # working a moment ago: one long prefill keeps it quiet for a while).
    vouched_until: float = 0.0
    restart_now: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    probe_soon: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # the router saw trouble

    @property
    def rank(self) -> int:
        return self.spec.rank

    @property
    def log(self) -> logging.LoggerAdapter:
        """The supervisor's logger, with the rank attached (a field of its own in JSON lines)."""
        return logging.LoggerAdapter(log, {"rank": self.spec.rank})

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

    def new_attempt(self, process: RankProcess) -> None:
        """A fresh process for this rank: what described the last one goes."""
        self.process = process
        self.attempt += 1
        self.consecutive_failures = self.deep_failures = 0
        self.last_probe_ms = self.last_probe_error = self.ready_after_s = self.ready_since = None
        self.outcome = self.exit_code = self.ended_monotonic = self.next_restart_at = None
        self.vouched_until = 0.0
        self.failure_reason = self.failure_error = None
        self.failure_exited = False
        self.killed_by_supervisor = self.hung = False
        self.restart_now.clear()
        self.probe_soon.clear()


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
