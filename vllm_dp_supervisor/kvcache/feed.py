"""One attempt of one rank: its engine's KV events read off a ZMQ subscription into a fresh
`BlockIndex`, in sequence. A task of its own in the worker's loop, never on a request's path.

- In sequence: the engine numbers its batches from 0. A batch after the next expected one is a
  gap (the subscription joined late, or ZMQ dropped what the worker did not read in time): the
  missing batches are asked of the engine's replay endpoint; when it cannot give them all (none
  configured, no answer within REPLAY_TIMEOUT_S, or its buffer no longer holds them), the index
  is dropped and rebuilt from what comes next. It may then know less than the engine, never more.
- A batch numbered 0 after others: a new engine behind the same endpoint (vLLM restarted its
  engine within the attempt); the index is dropped.
- Caught up at each connection: what the engine published before the subscription took effect
  (a worker started after the engine, ZMQ's late joiner) is asked of the replay endpoint at once,
  not at the next batch, so a new worker knows the cache the moment it can route by it.
- Trusted only while connected, and caught up: the monitor of the subscription says when the
  engine's end is there. A rank whose feed is not trusted is not routed by its cache (routing.py).

The caller makes a new feed for each attempt of a rank (fresh sockets, nothing buffered from the
last engine) and closes the old one: the index of an engine that ended goes with it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from vllm_dp_supervisor.kvcache import wire
from vllm_dp_supervisor.kvcache.index import BlockIndex

REPLAY_TIMEOUT_S = 2.0  # vLLM's publisher serves replays between its 100 ms polls of its queue
RECEIVE_HWM = 100_000  # batches the subscription buffers, as vLLM's publisher does

log = logging.getLogger("vllm_dp_supervisor.router")


@dataclasses.dataclass
class FeedCounts:
    """One rank's, over all its attempts (the counters on /metrics)."""
    batches: int = 0
    events: int = 0
    unreadable: int = 0  # events or batches that could not be read
    skipped: int = 0  # stored blocks not indexed (their parent unknown, or another medium)
    gaps: int = 0  # sequence gaps seen
    repaired: int = 0  # gaps filled from the replay endpoint
    drops: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # why


@dataclasses.dataclass(frozen=True)
class Endpoints:
    events: str  # where the engine publishes (a ZMQ endpoint a subscriber connects to)
    replay: str | None


class RankFeed:
    def __init__(self, context: zmq.asyncio.Context, endpoints: Endpoints, counts: FeedCounts,
                 limit: int = 1 << 22) -> None:
        self.endpoints = endpoints
        self.counts = counts
        self.index = BlockIndex(limit)
        self.connected = False
        self.caught_up = False  # since this connection, what came before it was asked of the replay endpoint
        self._expected: int | None = None  # the next batch's number; None: none read yet
        self._context = context
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("a feed starts once")
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"kv {self.endpoints.events}")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    @property
    def trusted(self) -> bool:
        return self.connected and self.caught_up

    async def _run(self) -> None:
        sub = self._context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        poller = zmq.asyncio.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            sub.connect(self.endpoints.events)
            while True:
                ready = dict(await poller.poll())
                if monitor in ready:
                    event = await recv_monitor_message(monitor)
                    self.connected = event["event"] == zmq.EVENT_CONNECTED
                    self.caught_up = False
                    if self.connected:
                        await self._catch_up()
                if sub in ready:
                    await self._take_published(await sub.recv_multipart())
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not take the worker down: this rank is routed by load
            log.exception("the KV events of %s stopped being read", self.endpoints.events)
            self.connected = False
        finally:  # (closing a socket twice is nothing: the context may have closed them at a worker's end)
            sub.close(0)
            monitor.close(0)

    async def _take_published(self, frames: list[bytes]) -> None:
        try:
            batch = wire.read_batch(frames)
        except wire.WireError as exc:
            self.counts.unreadable += 1
            log.debug("unreadable KV event batch from %s: %s", self.endpoints.events, exc)
            return
        if self._expected is not None and batch.seq == 0 and self._expected > 0:
            self._drop("engine restarted")
        elif batch.seq > (self._expected or 0):
            self.counts.gaps += 1
            if not await self._repair(0 if self._expected is None else self._expected, batch.seq):
                self._drop("gap not repaired")
        self._apply(batch)

    async def _catch_up(self) -> None:
        """At the first connection: the batches the engine published before it, from the replay
        endpoint. Without one, when it does not answer, or at a reconnection (the engine behind it
        may be a new one, numbering from 0 again), the next batch's number says what was missed."""
        if self.endpoints.replay is not None and self._expected is None:
            await self._replay(0, None)  # what it could not give, the next batch shows as a gap
        self.caught_up = True

    async def _repair(self, start: int, until: int) -> bool:
        """Batches `start` to `until` - 1 from the replay endpoint, applied; whether all came."""
        if not await self._replay(start, until):
            return False
        self.counts.repaired += 1
        return True

    async def _replay(self, start: int, until: int | None) -> bool:
        """Ask the replay endpoint for the batches from `start` (to `until` - 1; None: all it
        holds) and apply them in sequence. Whether it answered from `start` (and up to `until`)."""
        if self.endpoints.replay is None:
            return False
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            dealer.connect(self.endpoints.replay)
            await dealer.send_multipart(wire.replay_request(start))
            async with asyncio.timeout(REPLAY_TIMEOUT_S):
                while (batch := wire.read_replayed(await dealer.recv_multipart())) is not None:
                    if until is None or batch.seq < until:
                        if batch.seq > (start if self._expected is None else self._expected):
                            return False  # its buffer no longer holds the first ones
                        self._apply(batch)
        except (TimeoutError, wire.WireError, zmq.ZMQError):
            return False
        finally:
            dealer.close(0)
        return until is None or self._expected == until

    def _apply(self, batch: wire.Batch) -> None:
        if self._expected is not None and batch.seq < self._expected:
            return  # already applied (read live and replayed)
        self._expected = batch.seq + 1
        self.counts.batches += 1
        self.counts.events += len(batch.events)
        self.counts.unreadable += batch.unreadable
        index = self.index
        for event in batch.events:
            if isinstance(event, wire.Stored):
                placed = index.stored(event.hashes, event.parent, event.tokens, event.block_size, event.extras,
                                      event.medium)
                self.counts.skipped += len(event.hashes) - placed
            elif isinstance(event, wire.Removed):
                index.removed(event.hashes, event.medium)
            else:
                index.cleared()

    def _drop(self, why: str) -> None:
        self.counts.drops[why] += 1
        self.index.cleared()
        self._expected = None
