"""A worker's connections to the ranks: raw asyncio protocols parsed with httptools, kept alive
and reused, one request at a time each.

The response is handed to a `Sink` (the proxy's exchange) from inside `data_received`: no task
switch between a rank's bytes arriving and their being written to the client. A connection is
reused only while idle less than UPSTREAM_IDLE_S, well under the keep-alive vLLM's uvicorn
grants (5 s), so a request is rarely written into a connection the rank is closing.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Protocol, cast

import httptools

UPSTREAM_IDLE_S = 2.0
CONNECT_TIMEOUT_S = 3.0
IDLE_PER_RANK = 256  # kept-alive connections kept per rank; more are closed when released


class Sink(Protocol):
    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...
    def body(self, data: bytes) -> None: ...
    def complete(self) -> None: ...
    def lost(self, why: str) -> None: ...
    def flush(self) -> None: ...  # the end of one read from the rank: what it gave may go out in one write


class Connection(Protocol):
    """A kept-alive connection to a rank, as the router uses it (upstream.Upstream)."""
    closed: bool

    def send(self, data: bytes, sink: Sink, *, head_only: bool) -> bool: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def close(self) -> None: ...


class Connections(Protocol):
    """The connections to the ranks (upstream.Pool; a test's fake)."""
    async def acquire(self, rank: int, port: int, attempt: int) -> Connection: ...
    def release(self, conn: Connection) -> None: ...
    def retain(self, live: frozenset[tuple[int, int]]) -> None: ...
    def close(self) -> None: ...


class Upstream(asyncio.Protocol):
    def __init__(self, pool: Pool, key: tuple[int, int]) -> None:
        self._pool = pool
        self.key = key  # (rank, attempt)
        self.transport: asyncio.Transport | None = None
        self._sink: Sink | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_only = False
        self.reusable = False
        self.closed = False
        self.idle_since = 0.0

    # ---- asyncio ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self._sink is None or self._parser is None:
            self.close()  # bytes nobody asked for: this connection cannot be trusted with a request
            return
        sink = self._sink
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._end(f"malformed answer from the rank ({exc})")
        sink.flush()  # one write to the client per read from the rank, however many chunks it held

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        self._end("the rank closed the connection" if exc is None else f"connection lost ({exc})")

    # ---- httptools ----

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None and self._sink is not None
        status = self._parser.get_status_code()
        if status < 200:  # an interim answer (103 Early Hints): the real one follows
            self._headers = []
            return
        self._sink.head(status, self._headers)
        if self._head_only:  # an answer to HEAD has no body, whatever its content-length says
            sink, self._sink = self._sink, None
            self.reusable = False
            sink.complete()

    def on_body(self, body: bytes) -> None:
        if self._sink is not None:
            self._sink.body(body)

    def on_message_complete(self) -> None:
        assert self._parser is not None
        if self._parser.get_status_code() < 200 or self._sink is None:
            return
        sink, self._sink = self._sink, None
        self.reusable = self._parser.should_keep_alive()
        sink.complete()

    # ---- the proxy's side ----

    def send(self, data: bytes, sink: Sink, *, head_only: bool) -> bool:
        """Write a request; False if the connection is gone (nothing was sent)."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return False
        self._sink, self._headers, self._head_only, self.reusable = sink, [], head_only, False
        self._parser = httptools.HttpResponseParser(self)
        self.transport.write(data)
        return True

    def pause(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _end(self, why: str) -> None:
        sink, self._sink = self._sink, None
        if sink is not None:
            self.close()
            sink.lost(why)


class Pool:
    """Idle connections per (rank, attempt): a restarted rank never gets its old connections."""

    def __init__(self, host: str) -> None:
        self._host = host
        self._idle: dict[tuple[int, int], list[Upstream]] = {}
        self._live: frozenset[tuple[int, int]] = frozenset()

    async def acquire(self, rank: int, port: int, attempt: int) -> Upstream:
        """A connection to the rank: the most recently used idle one, or a new one. Raises
        OSError or TimeoutError when the rank cannot be reached."""
        key = (rank, attempt)
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < UPSTREAM_IDLE_S:
                return conn
            conn.close()
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: Upstream(self, key), self._host, port), CONNECT_TIMEOUT_S)
        return conn

    def release(self, connection: Connection) -> None:
        """Keep a connection whose answer is complete, if it may carry another request."""
        conn = cast(Upstream, connection)  # one of ours: acquire made it
        idle = self._idle.setdefault(conn.key, []) if conn.key in self._live else None
        if conn.closed or not conn.reusable or idle is None or len(idle) >= IDLE_PER_RANK:
            conn.close()
            return
        conn.resume()
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def forget(self, conn: Upstream) -> None:
        idle = self._idle.get(conn.key)
        if idle is not None and conn in idle:
            idle.remove(conn)

    def retain(self, live: frozenset[tuple[int, int]]) -> None:
        """Only (rank, attempt) pairs in `live` (ready now) keep idle connections."""
        self._live = live
        for key in [k for k in self._idle if k not in live]:
            for conn in self._idle.pop(key):
                conn.close()

    def close(self) -> None:
        self.retain(frozenset())
