"""One request's answer from one rank on its way to the client: the upstream connection's sink
(upstream.py). Holds the answer's head back until its first body byte, frames the body for the
client, tells the rank's activity (activity.py) of every byte, and ends with an `Outcome`.
"""

from __future__ import annotations

import asyncio
import enum
import http
import time

from vllm_dp_supervisor.router.activity import Activity
from vllm_dp_supervisor.router.client import ClientConnection, Request
from vllm_dp_supervisor.router.routes import HOP_BY_HOP
from vllm_dp_supervisor.router.upstream import Upstream


class Outcome(enum.Enum):
    COMPLETE = "complete"
    UNREACHABLE = "unreachable"  # the request never reached the rank
    LOST = "lost"  # the rank's connection ended before its answer did
    CLIENT_GONE = "client_gone"


class Exchange:
    """One request's answer from one rank to the client (the upstream connection's sink). The
    head is held back until the first body byte: until a byte went out, the request can still go
    to another rank."""

    def __init__(self, client: ClientConnection, request: Request, rank: int, activity: Activity) -> None:
        self.client = client
        self.rank = rank
        self.activity = activity  # told of every byte from the rank
        self.request = request
        self.upstream: Upstream | None = None
        self.done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.status = 0
        self.sent = False  # a byte went to the client
        self.ttfb: float | None = None
        self.sse = False
        self.chunked = False
        self.close_after = not request.keep_alive or client.closing
        self.why = ""
        self._head = b""
        self._ticket: int | None = None

    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.activity.byte(time.monotonic())
        self.status = status
        lines = [b"HTTP/1.1 %d %s" % (status, _reason(status))]
        length = None
        for name, value in headers:
            lname = name.lower()
            if lname in HOP_BY_HOP:
                continue
            if lname == b"content-length":
                length = value
            elif lname == b"content-type" and value.startswith(b"text/event-stream"):
                self.sse = True
            lines.append(name + b": " + value)
        bodiless = status in (204, 304) or self.request.method == b"HEAD"
        if length is None and not bodiless:
            if self.request.http11:
                lines.append(b"transfer-encoding: chunked")
                self.chunked = True
            else:
                self.close_after = True  # an HTTP/1.0 client reads to the end of the connection
        if self.close_after:
            lines.append(b"connection: close")
        lines.append(b"x-dp-rank: %d" % self.rank)  # which rank answered: for a client's logs
        self._head = b"\r\n".join(lines) + b"\r\n\r\n"

    def body(self, data: bytes) -> None:
        if data:
            self.activity.byte(time.monotonic())
            framed = b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data
            self._write(framed)

    def complete(self) -> None:
        self._write(b"0\r\n\r\n" if self.chunked else b"")
        self._finish(Outcome.COMPLETE)

    def lost(self, why: str) -> None:
        self.why = why
        self._finish(Outcome.LOST)

    def client_gone(self) -> None:
        if self.upstream is not None:
            self.upstream.close()  # the rank sees the disconnect and aborts the generation
        self._finish(Outcome.CLIENT_GONE)

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

    def _write(self, data: bytes) -> None:
        if not self.sent:
            self.sent = True
            self.ttfb = time.monotonic() - self.request.received
            data = self._head + data
        self.client.write(data)

    def _finish(self, outcome: Outcome) -> None:
        if not self.done.done():
            self.done.set_result(outcome)


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"
