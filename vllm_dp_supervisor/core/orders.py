"""What the machine decided that a mechanism must carry out, as values in a queue.

The machine decides (a group must restart, a rollout begins, a stalled rank must be judged) and
puts an order here; the composition root's dispatcher (supervisor.py) takes each and starts its
mechanism (loops/restart.py, loops/rollout.py, loops/judge.py). So the machine holds no
mechanism, nothing is wired into it after its construction, and a test reads what it ordered.
A mechanism started a moment later (the next turn of the event loop) changes nothing: each ran in
a task of its own before, too.
"""

from __future__ import annotations

import asyncio
import dataclasses

from vllm_dp_supervisor.core.records import RankGroup


@dataclasses.dataclass(frozen=True)
class Restart:
    """Run the restart sequence of `group`: drained first when `drain`, then stopped, then
    started again after `delay_s`."""
    group: RankGroup
    delay_s: float
    why: str
    drain: bool


@dataclasses.dataclass(frozen=True)
class Rollout:
    """Restart every group in turn (POST /rollout)."""


@dataclasses.dataclass(frozen=True)
class Judge:
    """Judge a stalled rank's attempt by its token counters."""
    rank: int
    attempt: int


Order = Restart | Rollout | Judge


class Orders:
    """The machine's outbox: put never waits; the dispatcher takes orders in the order given."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Order] = asyncio.Queue()

    def put(self, order: Order) -> None:
        self._queue.put_nowait(order)

    async def next(self) -> Order:
        return await self._queue.get()

    def taken(self) -> list[Order]:
        """Every order not yet taken, taken now (for a test that plays the dispatcher)."""
        orders = []
        while not self._queue.empty():
            orders.append(self._queue.get_nowait())
        return orders
