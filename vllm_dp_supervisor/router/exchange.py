"""One request's answer from one rank on its way to the client: the upstream connection's sink
(upstream.py). Holds the answer's head back until its first body byte, frames the body for the
client, tells the rank's activity (activity.py) of every byte, and ends with an `Outcome`.

A short 5xx answer is held whole before it goes out: if it is vLLM's "engine dead" error, the
rank failed, not the request, which may go to another rank (passage.py's retry rule).

A resumable stream's bytes go through its `Stream` (stream.py) on the way. A continuation (the
rest of a stream whose rank died, asked of another rank) sends no head of its own: the client has
had one; an answer other than 200 is a failure of the continuation, and nothing of it goes out.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable

from vllm_dp_supervisor.router.activity import Activity
from vllm_dp_supervisor.router.cached_tokens import CachedTokens
from vllm_dp_supervisor.router.client import ClientConnection, Request
from vllm_dp_supervisor.router.routes import HOP_BY_HOP, reason
from vllm_dp_supervisor.router.stream import NotTheSame, RankFailed, Stream, StreamEnded
from vllm_dp_supervisor.router.upstream import Connection
from vllm_dp_supervisor.server.probes import ENGINE_DEAD_MAX_BODY, engine_died


class Outcome(enum.Enum):
    COMPLETE = "complete"
    UNREACHABLE = "unreachable"  # the request never reached the rank
    LOST = "lost"  # the rank's connection ended before its answer did (or the router handed it off)
    REFUSED = "refused"  # a continuation answered other than 200
    CLIENT_GONE = "client_gone"


class Exchange:
    """One request's answer from one rank to the client (the upstream connection's sink). The
    head is held back until the first body byte: until a byte went out, the request can still go
    to another rank."""

    def __init__(self, client: ClientConnection, request: Request, rank: int, attempt: int, activity: Activity,
                 stream: Stream | None = None, *, continuation: bool = False,
                 on_first_out: Callable[[float], None] | None = None, read_cached: bool = False) -> None:
        """`on_first_out(when)`: told of this exchange's first byte out (monotonic); `read_cached`:
        read what the rank says its prefix cache hit of the prompt (`cached`)."""
        self.client = client
        self.rank = rank
        self.attempt = attempt  # the rank's attempt it went to (a restarted rank is a new one)
        self.activity = activity  # told of every byte from the rank
        self.request = request
        self.stream = stream  # a resumable stream's state, edited on its way out
        self.continuation = continuation
        self.upstream: Connection | None = None
        self.done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.status = 0
        self.sent = False  # a byte went to the client (for a continuation: its first byte)
        self.ttfb: float | None = None
        self.first_out: float | None = None  # monotonic, this exchange's first byte out
        self._on_first_out = on_first_out
        self.sse = continuation
        self.chunked = continuation and client.chunked
        self.close_after = not request.keep_alive or client.closing
        self.why = ""
        self._head = b""
        self._ticket: int | None = None
        self._held: bytearray | None = None  # a short 5xx answer, held whole (engine dead?)
        self.engine_dead = False  # the rank answered that its engine died
        self._pending: list[bytes] = []  # what this read from the rank gave the client, written at flush()
        self.cached = CachedTokens() if read_cached else None

    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.activity.byte(time.monotonic())
        self.status = status
        if self.continuation:
            return
        # Decided now, not when the request came: a drain that began meanwhile must say so in the
        # head, or the client takes the connection for kept-alive and sends on it as it closes.
        self.close_after = self.close_after or self.client.closing
        lines = [b"HTTP/1.1 %d %s" % (status, reason(status))]
        length = None
        for name, value in headers:
            lname = name.lower()
            if lname in HOP_BY_HOP:
                continue
            if lname == b"content-length":
                if self.stream is not None and status == 200:
                    continue  # edited on the way: its length changes
                length = value
            elif lname == b"content-type" and value.startswith(b"text/event-stream"):
                self.sse = True
            lines.append(name + b": " + value)
        if status != 200 or not self.sse:
            self.stream = None  # an error, or not the SSE stream asked for: passed on as it is
        if status >= 500 and not self.sse and length is not None and length.isdigit() and \
                int(length) <= ENGINE_DEAD_MAX_BODY:
            self._held = bytearray()
        bodiless = status in (204, 304) or self.request.method == b"HEAD"
        if (length is None or self.stream is not None) and not bodiless:
            if self.request.http11:
                lines.append(b"transfer-encoding: chunked")
                self.chunked = True
            else:
                self.close_after = True  # an HTTP/1.0 client reads to the end of the connection
        if self.close_after:
            lines.append(b"connection: close")
        lines.append(b"x-dp-rank: %d" % self.rank)  # which rank answered: for a client's logs
        self._head = b"\r\n".join(lines) + b"\r\n\r\n"
        self.client.chunked = self.chunked

    def body(self, data: bytes) -> None:
        if not data or self.done.done():
            # Ended already: what the rank sends after it is not the client's. Seen with real
            # vLLM: its error event (the engine died) ended the exchange, and the [DONE] read
            # after it, passed on, ended the client's stream as if whole, and nothing continued it.
            return
        self.activity.byte(time.monotonic())
        self.activity.chunks += 1  # the token path's load, counted as it passes (stats: the sum over ranks)
        if self.continuation and self.status != 200:
            return  # an error answer to a continuation: never the client's
        if self.cached is not None and self.status == 200:
            self.cached.feed(data)
        if self._held is not None:
            self._held += data
            return
        if self.stream is not None:
            try:
                data = self.stream.feed(data, self.continuation)
            except StreamEnded as ended:
                if ended.before:
                    self._write(self.frame(ended.before))
                self.lost(f"it ended the stream with an error: {ended}" if isinstance(ended, RankFailed)
                          else f"its continuation is not the same answer: {ended}" if isinstance(ended, NotTheSame)
                          else f"its stream cannot be read: {ended}")
                return
            if self.stream.own_stop and not self.done.done():
                self._write(self.frame(data))
                self.complete(early=True)  # the answer is whole; the rank is not waited for
                return
        if data:
            self._write(self.frame(data))

    def complete(self, *, early: bool = False) -> None:
        if self.done.done():
            return
        if self.continuation and self.status != 200:
            self._finish(Outcome.REFUSED)
            return
        if self._held is not None:
            held, self._held = bytes(self._held), None
            if engine_died(self.status, held):
                self.engine_dead = True
                self.lost("its engine died (it answered the request with vLLM's engine-dead error)")
                return
            self._write(self.frame(held))
        if self.stream is not None and not self.stream.done:
            if not self.stream.resumable:
                self._write(self.frame(self.stream.end()))
            else:  # the rank ended the stream mid-answer: as good as a death
                self.lost("the rank ended its stream mid-answer")
                return
        self._write(b"0\r\n\r\n" if self.chunked else b"")
        if early and self.upstream is not None:
            self.upstream.close()  # it may still be generating: closing it aborts that
        self._finish(Outcome.COMPLETE)

    def lost(self, why: str) -> None:
        self.why = why
        self._finish(Outcome.LOST)

    def client_gone(self) -> None:
        if self.upstream is not None:
            self.upstream.close()  # the rank sees the disconnect and aborts the generation
        self._finish(Outcome.CLIENT_GONE)

    def hand_off(self) -> None:
        """A planned stop of this rank: end this exchange as if the rank had died, so its stream
        continues on another rank."""
        if self.upstream is not None:
            self.upstream.close()  # the rank sees the disconnect and aborts the generation
        self.lost("handed off: its rank is being stopped")

    def watch(self) -> None:
        """Count this request as held by its rank (activity.py), until it ends or is paused."""
        if self._ticket is None:
            self._ticket = self.activity.sent(time.monotonic())

    def unwatch(self) -> None:
        if self._ticket is not None:
            self.activity.ended(self._ticket)
            self._ticket = None

    def pause(self) -> None:
        """The client stopped reading: so do we. The rank's silence is then ours, not a stall."""
        self.unwatch()
        if self.upstream is not None:
            self.upstream.pause()

    def resume(self) -> None:
        self.watch()
        if self.upstream is not None:
            self.upstream.resume()

    def frame(self, data: bytes) -> bytes:
        """`data` as the client's answer frames it (a chunk, or as it is)."""
        if not data:
            return b""
        return b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data

    def _write(self, data: bytes) -> None:
        if not data and (self.sent or self.continuation):
            return
        first = self.first_out is None and bool(data)
        if first or not self.sent:  # the clock is read once, and only for a first byte (not per chunk)
            now = time.monotonic()
            if first:
                self.first_out = now
                if self._on_first_out is not None:
                    self._on_first_out(now)
            if not self.sent:
                self.sent = True
                if not self.continuation:
                    self.ttfb = now - self.request.received
                    data = self._head + data
        self._pending.append(data)

    def flush(self) -> None:
        """The end of a read from the rank (or of the exchange): what it gave goes out in one write."""
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            self.client.write(data)

    def _finish(self, outcome: Outcome) -> None:
        self.flush()
        if not self.done.done():
            self.done.set_result(outcome)

