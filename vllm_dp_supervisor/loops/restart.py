"""The restart sequence of a group (one rank in replicas mode, every rank in dp mode): stop its
trees and verify them gone, wait the backoff (cut short by an operator's restart or by a stop),
start a new attempt of each rank. The machine decided the restart; this carries it out.
"""

from __future__ import annotations

import asyncio
import signal

from ..machine import Machine
from ..records import RankGroup
from ..states import SupervisorState
from .spawn import Spawner
from .tasks import Tasks
from .teardown import Teardown


class Restarter:
    def __init__(self, machine: Machine, tasks: Tasks, teardown: Teardown, spawner: Spawner) -> None:
        self._machine = machine
        self._tasks = tasks
        self._teardown = teardown
        self._spawner = spawner

    def start(self, group: RankGroup, delay: float, why: str) -> None:
        """The machine's `start_restart`: runs the sequence in a task of its own."""
        self._tasks.spawn(self._restart(group, delay, why))

    async def _restart(self, group: RankGroup, delay: float, why: str) -> None:
        machine, records = self._machine, group.records
        try:
            await self._teardown.stop_trees(records, signal.SIGTERM, interruptible=False)
            if machine.state is not SupervisorState.RUNNING:
                return
            for record in records:
                machine.backoff(record, delay, why)
            waits = [asyncio.ensure_future(e.wait()) for e in
                     (machine.stop_requested, *(r.restart_now for r in records))]
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            for record in records:
                if machine.state is not SupervisorState.RUNNING:
                    return
                machine.new_attempt(record, self._spawner.new_process(record.spec, record.attempt + 1))
                await self._spawner.start(record)
        finally:
            machine.restart_done(group)
