"""The restart sequence of a group (one rank in replicas mode, every rank in dp mode): drain it
when the machine says it can be (the router sends it nothing new; what it has in flight finishes
within --drain-timeout, and the streams still running then continue on other ranks: a hand-off),
stop its trees and verify them gone, wait the backoff (cut short by an operator's restart or by a
stop), start a new attempt of each rank. The machine decided the restart; this carries it out.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Protocol

from vllm_dp_supervisor.core.events import EventKind
from vllm_dp_supervisor.core.machine import Machine
from vllm_dp_supervisor.core.orders import Restart
from vllm_dp_supervisor.core.records import RankGroup
from vllm_dp_supervisor.core.states import SupervisorState
from vllm_dp_supervisor.loops.spawn import Spawner, process_of
from vllm_dp_supervisor.loops.tasks import Tasks
from vllm_dp_supervisor.loops.teardown import DRAIN_S, Teardown

log = logging.getLogger("supervisor")

# After a hand-off, how long the requests that cannot continue elsewhere get on top of the drain.
HAND_OFF_S = 2.0


class Drain(Protocol):
    """What a planned stop drains through: the router (router_workers/workers.py)."""

    async def quiesce(self, ranks: list[int], budget: float, cancel: asyncio.Event) -> int:
        """The requests still in flight on `ranks` once none is left or `budget` s passed."""

    def hand_off(self, ranks: list[int]) -> None:
        """Their streams still running continue on other ranks."""


class Restarter:
    def __init__(self, machine: Machine, tasks: Tasks, teardown: Teardown, spawner: Spawner,
                 drain: Drain | None, drain_timeout: float) -> None:
        """`drain`: the router (None when there is none: nothing to drain through)."""
        self._machine = machine
        self._tasks = tasks
        self._teardown = teardown
        self._spawner = spawner
        self._drainer = drain
        self._drain_timeout = drain_timeout

    def start(self, order: Restart) -> None:
        """Carry out the machine's order (orders.Restart), in a task of its own."""
        self._tasks.spawn(self._restart(order.group, order.delay_s, order.why, order.drain))

    async def _drain(self, group: RankGroup) -> None:
        drain, stop = self._drainer, self._machine.stop_requested
        assert drain is not None
        for record in group.records:
            self._machine.draining_rank(record)
        started = time.monotonic()
        left = await drain.quiesce(group.ranks, self._drain_timeout, stop)
        handed_off = bool(left) and not stop.is_set()
        if handed_off:
            log.info("ranks %s: %d request(s) still in flight after --drain-timeout %g s: their streams "
                     "continue on other ranks", group.ranks, left, self._drain_timeout)
            drain.hand_off(group.ranks)
            left = await drain.quiesce(group.ranks, HAND_OFF_S, stop)
        took = time.monotonic() - started
        if left:
            log.warning("ranks %s: %d request(s) that cannot continue elsewhere still in flight %.1f s into the "
                        "drain; stopping them anyway", group.ranks, left, took)
        else:
            log.info("ranks %s drained in %.2f s: nothing of theirs in flight", group.ranks, took)
        self._machine.events.publish(EventKind.DRAINED, group.records[0].rank, ranks=group.ranks,
                                     seconds=round(took, 3), left=left, handed_off=handed_off)

    async def _restart(self, group: RankGroup, delay: float, why: str, drain: bool) -> None:
        machine, records = self._machine, group.records
        try:
            if drain and self._drainer is not None:
                await self._drain(group)
                if machine.state is not SupervisorState.RUNNING:
                    return  # the pod's stop drains the router and stops every tree
            await self._teardown.stop_trees(records, signal.SIGTERM, interruptible=False)
            # The old attempts' last output, then their log files closed (each attempt has its own).
            await asyncio.gather(*(process_of(r.current).drain_output(DRAIN_S) for r in records))
            if machine.state is not SupervisorState.RUNNING:
                return
            for record in records:
                machine.backoff(record, delay, why)
            waits = [asyncio.ensure_future(e.wait()) for e in
                     (machine.stop_requested, *(r.current.restart_now for r in records))]
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
