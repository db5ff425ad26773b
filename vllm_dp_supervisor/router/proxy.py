"""One request through a worker: pick a ready rank, send it, stream the answer back; on a rank's
failure, send it again or answer the error an OpenAI client expects.

The retry rule never duplicates work a client could see: a request that never reached a rank
(the connection failed) goes to another rank whatever it is; one whose rank died before the
first byte of its answer went out goes again only if it is stateless (routes.RESENDABLE); once a
byte went out it is never sent again, and the answer ends as cleanly as it can: an SSE stream
with an error event and its end marker, anything else by closing the connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import http
import time
from collections.abc import Callable, Collection

from .balance import Balancer, RouterPolicy
from .client import ClientConnection, Request
from .routes import HOP_BY_HOP, error_response, family, resendable, sse_error_event
from .stats import WorkerStats
from .upstream import Pool, Upstream


@dataclasses.dataclass(frozen=True)
class Settings:
    host: str  # where the ranks are reached
    policy: RouterPolicy
    queue_timeout: float
    retries: int
    max_body: int


class Outcome(enum.Enum):
    COMPLETE = "complete"
    UNREACHABLE = "unreachable"  # the request never reached the rank
    LOST = "lost"  # the rank's connection ended before its answer did
    CLIENT_GONE = "client_gone"


class Exchange:
    """One request's answer from one rank to the client (the upstream connection's sink). The
    head is held back until the first body byte: until a byte went out, the request can still go
    to another rank."""

    def __init__(self, client: ClientConnection, request: Request, rank: int) -> None:
        self.client = client
        self.rank = rank
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

    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
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

    def pause(self) -> None:
        if self.upstream is not None:
            self.upstream.pause()

    def resume(self) -> None:
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


def upstream_request(request: Request, client_ip: bytes) -> bytes:
    """The request as the rank gets it: unchanged but for hop-by-hop headers, with its body's
    length and the client's address in X-Forwarded-For."""
    drop = set(HOP_BY_HOP) | {b"content-length", b"expect", b"x-forwarded-for"}
    forwarded = []
    for name, value in request.headers:
        lname = name.lower()
        if lname == b"connection":  # it may name more headers that are for this hop only
            drop.update(t.strip().lower() for t in value.split(b","))
        elif lname == b"x-forwarded-for":
            forwarded.append(value)
    lines = [request.method + b" " + request.url + b" HTTP/1.1"]
    lines += [name + b": " + value for name, value in request.headers if name.lower() not in drop]
    lines.append(b"x-forwarded-for: " + b", ".join([*forwarded, client_ip]))
    if request.body or request.method in (b"POST", b"PUT", b"PATCH"):
        lines.append(b"content-length: %d" % len(request.body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + request.body


class Router:
    """A worker's routing: the ready ranks as the supervisor last published them, its own
    in-flight counts, its connections to the ranks."""

    def __init__(self, settings: Settings, stats: WorkerStats, report_unreachable: Callable[[int, int, str], None],
                 report_load: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self.stats = stats
        self.balancer = Balancer(settings.policy)
        self.pool = Pool(settings.host)
        self.ready: dict[int, tuple[int, int]] = {}  # rank -> (port, attempt)
        self._ranks: list[int] = []  # the keys of `ready`, sorted once per view, not per request
        self._changed = asyncio.Event()
        self._report_unreachable = report_unreachable
        # Told on every view and whenever a request ends on a rank out of rotation: the supervisor
        # waits on it to stop a drained rank as soon as its last request is done.
        self._report_load = report_load

    def update(self, ready: dict[int, tuple[int, int]]) -> None:
        """A new view: these ranks are ready, at these ports and attempts."""
        self.ready = ready
        self._ranks = sorted(ready)
        self.pool.retain(frozenset((rank, attempt) for rank, (_, attempt) in ready.items()))
        self._changed.set()
        self._changed = asyncio.Event()
        self._report_load()

    async def pick(self, tried: Collection[int], deadline: float) -> int | None:
        """A ready rank this request has not failed on; waits for one until `deadline`."""
        while True:
            rank = self.balancer.choose(self._ranks, tried)
            if rank is not None:
                return rank
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return None

    async def handle(self, client: ClientConnection, request: Request) -> bool:
        """Answer one request; False when the client's connection must close."""
        s, endpoint, retries = self.settings, family(request.path), 0
        tried: set[int] = set()
        data = upstream_request(request, client.peer)
        while True:
            rank = await self.pick(tried, request.received + s.queue_timeout)
            if rank is None:
                self.stats.no_rank += 1
                client.write(error_response(503, "Service Unavailable", "no model server is ready; retry later",
                                            "service_unavailable", retry_after=1, close=client.closing))
                return request.keep_alive and not client.closing
            port, attempt = self.ready[rank]
            self.balancer.started(rank)
            try:
                outcome, exchange = await self._exchange(client, request, data, rank, port, attempt)
            finally:
                self.balancer.finished(rank)
                if rank not in self.ready:
                    self._report_load()
            duration = time.monotonic() - request.received
            if outcome is Outcome.CLIENT_GONE:
                return False
            if outcome is Outcome.COMPLETE:
                self.stats.observe(rank, exchange.status, endpoint, exchange.ttfb, duration)
                return not exchange.close_after
            if exchange.sent:  # bytes went out: never sent again; end it as cleanly as possible
                self.stats.cut_streams[str(rank)] += 1
                self.stats.observe(rank, exchange.status, endpoint, exchange.ttfb, duration)
                if exchange.sse and exchange.chunked:
                    message = f"the model server (rank {rank}) failed mid-answer: {exchange.why}"
                    event = sse_error_event(message)
                    client.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(event), event))
                    return not exchange.close_after
                return False
            tried.add(rank)
            if retries < s.retries and (outcome is Outcome.UNREACHABLE or resendable(request.path)):
                retries += 1
                self.stats.retries["unreachable" if outcome is Outcome.UNREACHABLE else "rank_failed"] += 1
                continue
            self.stats.observe(rank, 502, endpoint, None, duration)
            client.write(error_response(502, "Bad Gateway", f"the model server (rank {rank}) failed before "
                                        f"answering: {exchange.why}", "server_error", close=client.closing))
            return request.keep_alive and not client.closing

    async def _exchange(self, client: ClientConnection, request: Request, data: bytes, rank: int, port: int,
                        attempt: int) -> tuple[Outcome, Exchange]:
        exchange = Exchange(client, request, rank)
        try:
            upstream = await self.pool.acquire(rank, port, attempt)
        except (OSError, TimeoutError) as exc:
            exchange.why = f"cannot connect: {getattr(exc, 'strerror', None) or type(exc).__name__}"
            self._report_unreachable(rank, attempt, exchange.why)  # the supervisor decides what it means
            return Outcome.UNREACHABLE, exchange
        if not upstream.send(data, exchange, head_only=request.method == b"HEAD"):
            exchange.why = "the connection closed before the request was sent"
            return Outcome.UNREACHABLE, exchange
        exchange.upstream = upstream
        client.exchange = exchange
        if not client.writable.is_set():
            upstream.pause()
        try:
            outcome = await exchange.done
        finally:
            client.exchange = None
        if outcome is Outcome.COMPLETE:
            self.pool.release(upstream)
        else:
            upstream.close()
        return outcome, exchange
