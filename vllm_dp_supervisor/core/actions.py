"""The operator's actions on the state machine (the API checks the token; these check the state):
drain, undrain, restart a rank, roll every rank, stop. A part of `machine.Machine`, in a file of
its own for length; like the verdicts, they write only through the machine's writers.

A rollout's progress (`RolloutProgress`) is plain data the machine keeps for /status; the
rollout itself is carried out by loops/rollout.py, one group at a time.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from vllm_dp_supervisor.core.events import EventKind, EventLog
from vllm_dp_supervisor.core.orders import Orders, Rollout
from vllm_dp_supervisor.core.records import RankGroup, RankRecord, RefusedAction
from vllm_dp_supervisor.core.states import RankState, SupervisorState

log = logging.getLogger("supervisor")


@dataclasses.dataclass
class RolloutProgress:
    """What /status shows of the last rollout."""
    started_at: float  # wall clock
    groups: list[list[int]]
    state: str = "running"  # running, done, failed
    current: list[int] | None = None  # the ranks being restarted now
    done: list[int] = dataclasses.field(default_factory=list)
    why: str | None = None  # why it stopped, when it failed
    finished_at: float | None = None

    @property
    def running(self) -> bool:
        return self.state == "running"

    def readout(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class OperatorActions:
    """What the machine provides to the actions (see machine.py)."""
    records: list[RankRecord]
    groups: list[RankGroup]
    state: SupervisorState
    draining: bool
    events: EventLog
    rollout: RolloutProgress | None
    wall_clock: Callable[[], float]
    orders: Orders

    def _publish(self) -> None:
        raise NotImplementedError

    def _begin_restart(self, record: RankRecord, delay: float, why: str, *, planned: bool = False) -> None:
        raise NotImplementedError

    def request_stop(self, reason: str, sig: int = ..., *, second_kills: bool = False) -> None:
        raise NotImplementedError

    def drain(self) -> dict:
        self._refuse_while_stopping()
        was, self.draining = self.draining, True
        self._publish()
        if not was:
            log.info("draining: /ready answers 503 while the ranks keep serving")
            self.events.publish(EventKind.DRAIN, None, draining=True)
        return {"draining": True, "changed": not was}

    def undrain(self) -> dict:
        self._refuse_while_stopping()
        was, self.draining = self.draining, False
        self._publish()
        if was:
            log.info("undrained: /ready follows the ranks again")
            self.events.publish(EventKind.DRAIN, None, draining=False)
        return {"draining": False, "changed": was}

    def restart_rank(self, rank: int) -> dict:
        """Restart one rank now (a rank waiting in backoff starts at once); in dp mode its group.
        A rank that still runs is drained first: the router sends it nothing new, and what it
        has in flight finishes (within the stop budget) before it gets its signal."""
        self._refuse_while_stopping()
        record = self.records[rank]
        if record.state is RankState.BACKOFF:
            record.current.restart_now.set()
            return {"rank": rank, "restarting": True, "note": "backoff cut short"}
        if record.group.restarting:
            raise RefusedAction(f"rank {rank} is already restarting")
        record.group.budget.count_operator_restart()
        self._begin_restart(record, 0.0, "restart requested by an operator", planned=True)
        return {"rank": rank, "restarting": True}

    def operator_stop(self) -> dict:
        """POST /stop: the same as SIGTERM."""
        self._refuse_while_stopping()
        self.request_stop("POST /stop by an operator")
        return {"stopping": True}

    # ---- a rolling restart: every group in turn (loops/rollout.py carries it out) ----

    def begin_rollout(self) -> dict:
        """POST /rollout. 409 while one runs."""
        self._refuse_while_stopping()
        if self.rollout is not None and self.rollout.running:
            raise RefusedAction(f"a rollout is under way (restarting ranks {self.rollout.current}, "
                                f"done: {self.rollout.done})")
        groups = [g.ranks for g in self.groups]
        self.rollout = RolloutProgress(round(self.wall_clock(), 3), groups)
        self._publish()  # the quorum a rollout keeps (machine.py)
        log.info("rollout: restarting %s one group at a time", " then ".join(map(str, groups)))
        self.events.publish(EventKind.ROLLOUT, None, state="started", groups=groups)
        self.orders.put(Rollout())
        return {"rollout": "started", "groups": groups}

    def rollout_restart(self, group: RankGroup) -> None:
        """The rollout's next step: a planned restart of `group`."""
        assert self.rollout is not None
        self.rollout.current = group.ranks
        group.budget.count_operator_restart()
        self.events.publish(EventKind.ROLLOUT, None, state="restarting", ranks=group.ranks)
        self._begin_restart(group.records[0], 0.0, "rollout", planned=True)

    def rollout_step_done(self, group: RankGroup) -> None:
        assert self.rollout is not None
        self.rollout.done.extend(group.ranks)
        self.rollout.current = None
        self.events.publish(EventKind.ROLLOUT, None, state="ranks_ready", ranks=group.ranks)

    def rollout_ended(self, why_not: str | None) -> None:
        """Every group restarted and ready again (None), or why the rollout stopped."""
        progress = self.rollout
        assert progress is not None
        progress.state, progress.why = ("done", None) if why_not is None else ("failed", why_not)
        progress.finished_at = round(self.wall_clock(), 3)
        self._publish()
        if why_not is None:
            log.info("rollout done: every rank restarted and ready")
        else:
            log.error("rollout stopped: %s", why_not)
        self.events.publish(EventKind.ROLLOUT, None, state=progress.state, why=why_not, done=progress.done)

    def _refuse_while_stopping(self) -> None:
        if self.state is not SupervisorState.RUNNING:
            raise RefusedAction(f"the supervisor is {self.state.value}")
