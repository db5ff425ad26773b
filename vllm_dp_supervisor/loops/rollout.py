"""A rolling restart (POST /rollout): each group in turn (each rank in replicas mode, the whole
dp group in dp mode) is drained, stopped, started again, and waited for until ready; then the
next. A group that does not come back ready stops the rollout, which says why; the machine's own
restart policy then deals with that rank as with any other failure.

The machine decides and records (actions.py); this only sequences and watches the published view.
"""

from __future__ import annotations

import asyncio
import time

from vllm_dp_supervisor.core.machine import Machine
from vllm_dp_supervisor.core.records import RankGroup
from vllm_dp_supervisor.core.states import RankState, SupervisorState
from vllm_dp_supervisor.loops.tasks import Tasks
from vllm_dp_supervisor.settings.config import Config

# Beyond its stop budget and --startup-timeout, how long a group may take to come back (the
# machine judges a rank that is not ready by --startup-timeout unhealthy well before this).
SLACK_S = 30.0


class Rollout:
    def __init__(self, config: Config, machine: Machine, tasks: Tasks) -> None:
        self._config = config
        self._machine = machine
        self._tasks = tasks

    def start(self) -> None:
        """Carry out the machine's order to roll every group (orders.Rollout)."""
        self._tasks.spawn(self._run())

    async def _run(self) -> None:
        machine = self._machine
        why_not: str | None = None
        try:
            for group in machine.groups:
                why_not = await self._roll(group)
                if why_not is not None:
                    break
        finally:
            if machine.rollout is not None and machine.rollout.running:
                machine.rollout_ended(why_not if why_not is not None else
                                      "the supervisor is stopping" if machine.state is not SupervisorState.RUNNING
                                      else None)

    async def _roll(self, group: RankGroup) -> str | None:
        machine = self._machine
        deadline = time.monotonic() + self._config.stop_budget + self._config.startup_timeout + SLACK_S
        # A group already restarting (it failed a moment ago) finishes that first.
        while group.restarting or any(r.state is not RankState.READY for r in group.records):
            if (why := await self._next_change(group, deadline, "to be ready before its turn")) is not None:
                return why
        attempts = {r.rank: r.attempt for r in group.records}
        machine.rollout_restart(group)
        while True:
            new = [r for r in group.records if r.attempt > attempts[r.rank]]
            for r in new:  # first: a failure may also be what stops the pod
                a = r.current
                if a.failure_reason is not None or a.state in (RankState.UNHEALTHY, RankState.EXITED,
                                                               RankState.BACKOFF):
                    return f"rank {r.rank} did not come back: {a.failure_reason or a.outcome or a.state.value}"
            if machine.state is not SupervisorState.RUNNING:
                return "the supervisor is stopping"
            if len(new) == len(group.records) and not group.restarting and \
                    all(r.state is RankState.READY for r in new):
                machine.rollout_step_done(group)
                return None
            if (why := await self._next_change(group, deadline, "to be ready again")) is not None:
                return why

    async def _next_change(self, group: RankGroup, deadline: float, waiting: str) -> str | None:
        """Wait for the next published view; why the rollout stops, if it must."""
        machine = self._machine
        if machine.state is not SupervisorState.RUNNING:
            return "the supervisor is stopping"
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            await asyncio.wait_for(machine.snapshots.next(machine.snapshots.current.version), remaining)
        except TimeoutError:
            states = ", ".join(f"rank {r.rank} {r.state.value}" for r in group.records)
            return f"waited too long for ranks {group.ranks} {waiting} ({states})"
        return None
