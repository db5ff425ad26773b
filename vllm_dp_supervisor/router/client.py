"""A client's connection to a router worker: requests parsed with httptools, within bounds, and
handed to the proxy one at a time (pipelined requests wait their turn, reading paused).

Bounds: the URL (8 KiB), the head (100 lines, 32 KiB), the body (--router-max-body); a request
must arrive whole within REQUEST_TIMEOUT_S of its first byte; an idle kept-alive connection is
closed after KEEPALIVE_S. What breaks them gets its 4xx and the connection is closed.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import fcntl
import sys
import termios
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import httptools

from vllm_dp_supervisor.router.routes import body_json, error_response

MAX_URL = 8 << 10
MAX_HEAD_BYTES = 32 << 10
MAX_HEADERS = 100
REQUEST_TIMEOUT_S = 60.0
KEEPALIVE_S = 30.0
WRITE_HIGH_WATER = 64 << 10  # the client's unsent bytes at which we stop reading from its rank


_UNREAD = object()


class _Rejected(Exception):
    """Raised from a parser callback once the request was answered with a 4xx: stop parsing."""


@dataclasses.dataclass
class Request:
    method: bytes
    url: bytes
    path: bytes
    http11: bool
    headers: list[tuple[bytes, bytes]]
    body: bytes
    keep_alive: bool
    received: float  # monotonic, when its last byte arrived
    trace: Any = None  # its spans (tracing.RequestTrace), under --otlp-traces-endpoint
    _json: Any = dataclasses.field(default=_UNREAD, init=False, repr=False, compare=False)

    def json(self) -> dict[str, Any] | None:
        """The body as a JSON object, parsed on first use and shared by whoever reads it (the
        policy, the continuation's plan); None when it is not one."""
        if self._json is _UNREAD:
            self._json = body_json(self.body)
        return cast("dict[str, Any] | None", self._json)


class ClientConnection(asyncio.Protocol):
    def __init__(self, handle: Callable[[ClientConnection, Request], Awaitable[bool]], max_body: int,
                 on_reject: Callable[[int], None], connections: set[ClientConnection]) -> None:
        """`handle`: answers one request; False when the connection must close afterwards."""
        self._handle = handle
        self._max_body = max_body
        self._on_reject = on_reject
        self._connections = connections
        self.transport: asyncio.Transport | None = None
        self.peer = b"unknown"
        self._parser = httptools.HttpRequestParser(self)
        self._pending: collections.deque[Request] = collections.deque()
        self._serving = False
        self._timer: asyncio.TimerHandle | None = None
        self._reset()
        self.exchange: Any = None  # the answer being streamed (proxy.Exchange), for flow control
        self.writable = asyncio.Event()
        self.writable.set()
        self.closing = False  # the worker drains: close after the answer under way
        self.chunked = False  # the answer under way is framed in chunks (a continuation keeps it so)
        self.idle_since = time.monotonic()

    def _reset(self) -> None:
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._body = bytearray()
        self._in_request = False

    # ---- asyncio ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = str(peer[0]).encode()
        self._connections.add(self)
        self._arm(KEEPALIVE_S)

    def data_received(self, data: bytes) -> None:
        if not self._in_request and not self._pending and not self._serving:
            self._arm(REQUEST_TIMEOUT_S)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(501, "Not Implemented", "connection upgrades (websockets) are not routed")
        except httptools.HttpParserError as exc:
            # A callback that rejected the request answered already and closed the connection.
            if self.transport is not None and not self.transport.is_closing():
                self._reject(400, "Bad Request", f"malformed request: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        self._cancel_timer()
        self.writable.set()
        if self.exchange is not None:
            self.exchange.client_gone()

    def pause_writing(self) -> None:
        self.writable.clear()
        if self.exchange is not None:
            self.exchange.pause()

    def resume_writing(self) -> None:
        self.writable.set()
        if self.exchange is not None:
            self.exchange.resume()

    # ---- httptools ----

    def on_message_begin(self) -> None:
        self._reset()
        self._in_request = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_URL:
            self._reject(414, "URI Too Long", f"the URL is over {MAX_URL} bytes")
            raise _Rejected

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._head_bytes += len(name) + len(value) + 4
        if len(self._headers) > MAX_HEADERS or self._head_bytes > MAX_HEAD_BYTES:
            self._reject(431, "Request Header Fields Too Large",
                         f"at most {MAX_HEADERS} header lines and {MAX_HEAD_BYTES >> 10} KiB of headers")
            raise _Rejected

    def on_headers_complete(self) -> None:
        length, expects = None, False
        for name, value in self._headers:
            lname = name.lower()
            if lname == b"content-length" and value.strip().isdigit():
                length = int(value)
            elif lname == b"expect" and value.lower() == b"100-continue":
                expects = True
        if length is not None and length > self._max_body:
            self._too_large()  # before any 100 Continue: the client need not send the body at all
        if expects and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body += body
        if len(self._body) > self._max_body:
            self._too_large()

    def on_message_complete(self) -> None:
        parsed = httptools.parse_url(self._url)
        self._pending.append(Request(
            self._parser.get_method(), self._url, parsed.path, self._parser.get_http_version() == "1.1",
            self._headers, bytes(self._body), self._parser.should_keep_alive(), time.monotonic()))
        self._in_request = False
        self._cancel_timer()
        if self.transport is not None and len(self._pending) > 1:
            self.transport.pause_reading()  # pipelining: at most two requests wait here
        if not self._serving:
            self._serving = True
            asyncio.get_running_loop().create_task(self._serve())

    # ---- answering ----

    async def _serve(self) -> None:
        try:
            while self._pending and self.transport is not None and not self.transport.is_closing():
                request = self._pending.popleft()
                # Closed after an answer that said so, never after one that promised keep-alive
                # (a drain that began meanwhile answers the next request with connection: close).
                if not await self._handle(self, request):
                    self.transport.close()
                    return
                self.transport.resume_reading()
        finally:
            self._serving = False
            self.idle_since = time.monotonic()
        if self.transport is not None and not self.transport.is_closing():
            self._arm(REQUEST_TIMEOUT_S if self._in_request else KEEPALIVE_S)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def idle(self) -> bool:
        return not self._serving and not self._in_request and not self._pending and not self._unread()

    def _unread(self) -> bool:
        """Bytes of a next request are in the socket, not yet read: closing now would reset it."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None:
            return False
        try:
            waiting = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return False
        return int.from_bytes(waiting, sys.byteorder) > 0

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _too_large(self) -> None:
        self._reject(413, "Payload Too Large", f"request body over --router-max-body ({self._max_body} bytes)")
        raise _Rejected

    def _reject(self, status: int, reason: str, message: str) -> None:
        """Answer a request the router will not route, and close: the rest of it is not read."""
        if self.transport is None or self.transport.is_closing():
            return
        self._on_reject(status)
        self.transport.write(error_response(status, reason, message, "invalid_request_error", close=True))
        self.transport.close()

    def _arm(self, seconds: float) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expired)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self._in_request:
            self._reject(408, "Request Timeout", f"the request did not arrive within {REQUEST_TIMEOUT_S:g} s")
        elif self.idle():
            self.close()
