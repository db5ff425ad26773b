"""What keeps the supervisor's port answering when its clients are hostile or broken.

The API listens on the pod IP, so anyone who reaches it can send anything. An OOM kill or a
wedged event loop here takes every rank down with it, so each connection is bounded:
- a request's line and headers: at most HEAD_BYTES in at most MAX_HEADERS lines, else 431;
- a request body: at most BODY_BYTES (no route takes more than a few bytes), else 413;
- a request must arrive whole within REQUEST_TIMEOUT_S of its first byte (or of the connection:
  a client that connects and says nothing is a slowloris too), else 408 and close; between
  requests a kept-alive connection may idle `timeout_keep_alive` seconds (uvicorn's own);
- at most `max_connections` at once: one more and the connection idle the longest (no request
  in progress) is closed to make room, the way nginx reuses idle connections, so a probe always
  gets through; if none is idle the newcomer gets 503.
Garbage is answered and logged at most once a minute with a count, never once per request.

Never blocks and never logs per connection: everything here runs on the event loop.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from vllm_dp_supervisor.settings.config import API_BACKLOG

HEAD_BYTES = 16 * 1024
MAX_HEADERS = 100
BODY_BYTES = 64 * 1024
REQUEST_TIMEOUT_S = 10.0
# Descriptors kept for everything but API clients: a rank's pipes, pidfd, log files and probe
# connections, the guardian's pipe, the listening socket.
RESERVED_FDS = 64
FDS_PER_RANK = 12
MAX_CONNECTIONS = 1000
# asyncio accepts up to `backlog` connections per loop iteration, and a connection is looked at
# (and another evicted, its descriptor closed) two to three iterations later: the budget leaves
# room for ACCEPT_BURSTS bursts in flight, and the backlog is small.
ACCEPT_BACKLOG = API_BACKLOG
ACCEPT_BURSTS = 4

log = logging.getLogger("supervisor")


class RateLimitedLog:
    """A message that can repeat without end (one per bad request): the first occurrence, then
    at most one line a `period` with how many were not shown."""

    def __init__(self, logger: logging.Logger, level: int, period: float = 60.0) -> None:
        self._logger, self._level, self._period = logger, level, period
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(message, -self._period) < self._period:
            self._suppressed[message] = self._suppressed.get(message, 0) + 1
            return
        self._last[message] = now
        more = self._suppressed.pop(message, 0)
        self._logger.log(self._level, "%s%s", message, f" ({more} more since the last report)" if more else "")


bad_request_log = RateLimitedLog(log, logging.WARNING)


class _AcceptErrors(logging.Filter):
    """asyncio logs 'socket.accept() out of system resource' with a traceback at every retry
    while the process has no descriptor left (EMFILE): one line a minute instead."""

    def __init__(self) -> None:
        super().__init__()
        self._report = RateLimitedLog(log, logging.ERROR)

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("socket.accept() out of system resource"):
            return True
        exc = record.exc_info[1] if record.exc_info else None
        self._report(f"the API cannot accept connections: {getattr(exc, 'strerror', None) or exc} "
                     "(open-file limit reached)")
        return False


def quiet_accept_errors() -> None:
    logging.getLogger("asyncio").addFilter(_AcceptErrors())


def raise_fd_limit() -> int:
    """The soft open-file limit raised to the hard one (as vLLM does); returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_budget(fd_limit: int, ranks: int) -> int:
    """How many API connections fit beside what the supervisor itself needs."""
    return max(8, min(MAX_CONNECTIONS, fd_limit - RESERVED_FDS - FDS_PER_RANK * ranks
                                     - ACCEPT_BURSTS * ACCEPT_BACKLOG))


class _Answered:
    """What stands for uvicorn's request cycle after a request answered at once: complete, so
    uvicorn's own callbacks (body, end of message, connection lost, shutdown) leave it alone."""
    response_complete = True
    more_body = False
    disconnected = False
    keep_alive = False

    class message_event:  # uvicorn calls cycle.message_event.set()
        @staticmethod
        def set() -> None:
            pass


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds in the module docstring, and a fast path: a
    GET or HEAD whose path `answer_at_once` answers (the probes) is answered in the same turn of
    the loop as its last header byte, without an ASGI task."""

    max_connections = MAX_CONNECTIONS  # set from the open-file limit by the API server
    # path → (status, JSON body), or None for the app to answer; set by the API server
    answer_at_once: Callable[[bytes], tuple[int, bytes] | None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = self._parsed_head = 0  # raw bytes while in a head; parsed head bytes
        self._header_count = 0
        self._body_bytes = 0
        self._too_large: tuple[int, str] | None = None
        self._request_timer: Any = None
        self.last_active = time.monotonic()

    # ---- the connection ----

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections and not self._evict_idle():
            bad_request_log(f"API connection limit ({self.max_connections}) reached with every "
                            "connection busy: refusing new ones")
            self._refuse(503, "too many connections")
            return
        self._arm_request_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_request_timer()
        super().connection_lost(exc)

    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _evict_idle(self) -> bool:
        """Close the connection idle the longest, other than this one. False if none is idle."""
        idle = [c for c in self.connections if c is not self and isinstance(c, GuardedHttpProtocol) and c._idle()]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.last_active)
        oldest.transport.close()
        self.connections.discard(oldest)
        return True

    # ---- bytes in ----

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        self._unset_keepalive_if_required()
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "upgrades are not supported")
            return
        except httptools.HttpParserError:
            if self._too_large is not None:
                self._refuse(*self._too_large)
            else:
                bad_request_log("malformed HTTP request(s) on the supervisor's port: answered 400")
                self._refuse(400, "malformed HTTP request")
            return
        if self._in_head and self._head_bytes > HEAD_BYTES:  # still no end of headers in sight
            self._refuse(431, f"request line and headers over {HEAD_BYTES} bytes")

    # ---- parser callbacks (called from feed_data) ----

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._parsed_head = True, 0, 0
        self._header_count = self._body_bytes = 0
        self._arm_request_timer()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > MAX_HEADERS:
            self._reject(431, f"more than {MAX_HEADERS} header lines")
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_head(self, n: int) -> None:
        """Exact, whatever the chunking (data_received's count bounds a head never completed)."""
        self._parsed_head += n
        if self._parsed_head > HEAD_BYTES:
            self._reject(431, f"request line and headers over {HEAD_BYTES} bytes")

    def _reject(self, status: int, reason: str) -> None:
        """From a parser callback: httptools raises HttpParserCallbackError out of feed_data,
        where data_received answers `status`."""
        self._too_large = (status, reason)
        raise ValueError(reason)

    def on_headers_complete(self) -> None:
        self._in_head = False
        length = dict(self.headers).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > BODY_BYTES):
            self._reject(413, f"request body over {BODY_BYTES} bytes")
        if not self._answered_at_once(length):
            super().on_headers_complete()

    def _answered_at_once(self, length: bytes | None) -> bool:
        """Answer a probe here, if it is one and nothing on this connection is still answering
        (a pipelined request keeps its turn: the app answers it)."""
        method = self.parser.get_method()
        if self.answer_at_once is None or method not in (b"GET", b"HEAD") or length not in (None, b"0") \
                or not self._idle() or self.pipeline or self.parser.should_upgrade():
            return False
        found = self.answer_at_once(httptools.parse_url(self.url).path)
        if found is None:
            return False
        status, body = found
        keep_alive = self.parser.get_http_version() == "1.1" and self.parser.should_keep_alive()
        self.transport.write(b"".join([
            STATUS_LINE[status], b"content-type: application/json\r\ncontent-length: ",
            str(len(body)).encode(), b"\r\n" if keep_alive else b"\r\nconnection: close\r\n", b"\r\n",
            b"" if method == b"HEAD" else body]))
        self._cancel_request_timer()
        self.cycle = _Answered()  # type: ignore[assignment]
        if keep_alive:
            self.on_response_complete()  # counts it, re-arms the keep-alive timer
        else:
            self.transport.close()
        return True

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > BODY_BYTES:  # chunked: no length up front
            self._reject(413, f"request body over {BODY_BYTES} bytes")
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._cancel_request_timer()
        super().on_message_complete()

    # ---- deadlines and refusals ----

    def _arm_request_timer(self) -> None:
        self._cancel_request_timer()
        self._request_timer = self.loop.call_later(REQUEST_TIMEOUT_S, self._request_too_slow)

    def _cancel_request_timer(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None

    def _request_too_slow(self) -> None:
        self._request_timer = None
        self._refuse(408, f"request not received whole within {REQUEST_TIMEOUT_S:g} s")

    def _refuse(self, status: int, reason: str) -> None:
        """Answer `status` with a one-line JSON error and close; the request never reaches the app."""
        self._cancel_request_timer()
        if self.transport.is_closing():
            return
        body = b'{"error": "' + reason.encode() + b'"}'
        self.transport.write(b"".join([
            STATUS_LINE[status], b"content-type: application/json\r\n",
            b"content-length: ", str(len(body)).encode(), b"\r\nconnection: close\r\n\r\n", body]))
        self.transport.close()
