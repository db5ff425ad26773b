"""Fault events for `GET /events`: a bounded history and live subscribers that never slow us down.

Publishing never waits: each subscriber has a bounded queue, and one that falls that far behind
is dropped (its stream ends; it can reconnect with Last-Event-ID and replay what it missed, as
long as that is still among the last `HISTORY` events).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import json
import time
from collections.abc import AsyncGenerator
from typing import Any


class EventKind(enum.StrEnum):
    """Every kind of event /events carries (its `kind` field and its SSE `event:` name)."""
    STATE = "state"  # a rank moved to another state
    SUPERVISOR = "supervisor"  # the supervisor moved to another state
    STOP = "stop"  # a stop began: asked for, or decided by a failure
    RESTART = "restart"  # a group's restart was decided
    EXIT = "exit"  # a rank's server exited, with its last words
    PROBE_FAILURES = "probe_failures"  # a rank's probes (or deep probes) failed --failure-threshold times in a row
    STALLED = "stalled"  # the router saw a rank hold requests and send nothing back
    FAULT = "fault"  # vLLM's fault tolerance reported a faulted engine
    RECOVERED = "recovered"  # its in-engine recovery worked
    RECOVERY_FAILED = "recovery_failed"  # it did not
    DRAIN = "drain"  # an operator drained or undrained the pod
    DRAINED = "drained"  # a planned restart finished draining its ranks
    ROLLOUT = "rollout"  # a rollout's progress
    GUARDIAN = "guardian"  # the process-tree guardian died and was started again
    ROUTER_WORKER = "router_worker"  # a router worker died and is started again
    RESUMED = "resumed"  # a stream cut on one rank went on on another


HISTORY = 1000
SUBSCRIBER_QUEUE = 1000
# Details that quote a rank's own output: sent only to readers allowed the ranks' log lines.
RANK_WORDS = frozenset({"last_error"})


@dataclasses.dataclass(frozen=True)
class Event:
    id: int
    time: float
    kind: EventKind
    rank: int | None
    details: dict[str, Any]

    def as_dict(self, rank_logs: bool = True) -> dict[str, Any]:
        details = self.details if rank_logs else {k: v for k, v in self.details.items() if k not in RANK_WORDS}
        return {"id": self.id, "time": self.time, "kind": self.kind.value, "rank": self.rank, **details}

    def sse(self, rank_logs: bool = True) -> bytes:
        """One SSE event; `event:` names its kind, so a browser's EventSource can listen to one
        kind (addEventListener("exit", ...)); onmessage then sees none: it hears only unnamed."""
        return f"id: {self.id}\nevent: {self.kind.value}\ndata: {json.dumps(self.as_dict(rank_logs))}\n\n".encode()


_END = object()  # queued to every subscriber when the log closes


class Subscriber:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue(SUBSCRIBER_QUEUE + 1)  # + room for _END
        self.dropped = False


class EventLog:
    def __init__(self) -> None:
        self._history: collections.deque[Event] = collections.deque(maxlen=HISTORY)
        self._next_id = 1
        self._subscribers: set[Subscriber] = set()
        self.closed = False

    def publish(self, kind: EventKind, rank: int | None = None, **details: Any) -> Event:
        event = Event(self._next_id, round(time.time(), 6), kind, rank, details)
        self._next_id += 1
        self._history.append(event)
        for sub in list(self._subscribers):
            if sub.queue.qsize() >= SUBSCRIBER_QUEUE:
                sub.dropped = True  # too slow: its stream ends, it may reconnect and replay
                self._subscribers.discard(sub)
                sub.queue.put_nowait(_END)
            else:
                sub.queue.put_nowait(event)
        return event

    def close(self) -> None:
        """No more events: every stream ends after what it has queued."""
        self.closed = True
        for sub in self._subscribers:
            sub.queue.put_nowait(_END)
        self._subscribers.clear()

    def since(self, last_id: int) -> list[Event]:
        return [e for e in self._history if e.id > last_id]

    async def follow(self, last_id: int | None, heartbeat: float = 15.0) -> AsyncGenerator[Event | None, None]:
        """The kept events after `last_id` (none if it is None), then live ones as they happen,
        until the log closes or this subscriber falls SUBSCRIBER_QUEUE events behind.
        Yields None after `heartbeat` seconds of silence, for a keep-alive comment."""
        sub = Subscriber()
        if self.closed:
            sub.queue.put_nowait(_END)
        else:
            self._subscribers.add(sub)
        try:
            if last_id is not None:
                for event in self.since(last_id):
                    yield event
                    last_id = event.id
            while True:
                try:
                    event = await asyncio.wait_for(sub.queue.get(), heartbeat)
                except TimeoutError:
                    yield None
                    continue
                if event is _END:
                    return
                if last_id is not None and event.id <= last_id:
                    continue  # already replayed from the history
                yield event
        finally:
            self._subscribers.discard(sub)
