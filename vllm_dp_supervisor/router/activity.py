"""What a router worker sees of each rank's answers: which requests it has in flight there and
when the rank last sent a byte. A rank that holds requests and sends nothing back for
--stall-timeout seconds is stalled: the worker reports it, and the supervisor judges it (a hung
engine, or one long prefill; loops/judge.py). Pure: the time comes in.

Bytes from any of the rank's answers count: a long prefill of one request while the rank streams
others is not a stall; a rank that has gone silent on every request is.
"""

from __future__ import annotations


class Activity:
    __slots__ = ("_next", "chunks", "inflight", "last_byte")

    def __init__(self) -> None:
        self.last_byte = 0.0
        self.chunks = 0  # pieces of answers the rank sent, in all
        self.inflight: dict[int, float] = {}  # ticket -> when the request went to the rank
        self._next = 0

    def sent(self, now: float) -> int:
        """A request went to the rank: its ticket."""
        ticket = self._next
        self._next += 1
        self.inflight[ticket] = now
        return ticket

    def byte(self, now: float) -> None:
        self.last_byte = now

    def ended(self, ticket: int) -> None:
        self.inflight.pop(ticket, None)

    def quiet_for(self, now: float) -> float:
        """How long the rank has sent nothing while holding requests (0 when it holds none): since
        its last byte, or since the oldest request it holds went out, whichever came later."""
        if not self.inflight:
            return 0.0
        return now - max(self.last_byte, min(self.inflight.values()))
