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
import time
from collections.abc import Callable, Collection

from vllm_dp_supervisor.router import affinity
from vllm_dp_supervisor.router.activity import Activity
from vllm_dp_supervisor.router.balance import Balancer
from vllm_dp_supervisor.router.client import ClientConnection, Request
from vllm_dp_supervisor.router.exchange import Exchange, Outcome
from vllm_dp_supervisor.router.routes import HOP_BY_HOP, error_response, family, resendable, sse_error_event
from vllm_dp_supervisor.router.stats import WorkerStats
from vllm_dp_supervisor.router.upstream import Pool
from vllm_dp_supervisor.settings.config import RouterPolicy, RouterSettings


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

    def __init__(self, settings: RouterSettings, stats: WorkerStats,
                 report_unreachable: Callable[[int, int, str], None], report_load: Callable[[], None]) -> None:
        """`report_unreachable(rank, attempt, why)`: a rank it could not connect to;
        `report_load()`: its view and in-flight counts changed (worker.py sends them)."""
        self.settings = settings
        self._session_header = settings.session_header.lower().encode()
        self.stats = stats
        self.balancer = Balancer(settings.policy, bound=settings.load_bound)
        self.pool = Pool(settings.host)
        self.ready: dict[int, tuple[int, int]] = {}  # rank -> (port, attempt)
        self.activity: dict[int, Activity] = {}  # per rank: what it holds, when it last sent a byte
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

    def affinity_key(self, request: Request) -> int | None:
        """What pins this request to a rank under the prefix or session policy; None: balanced
        by load."""
        policy = self.settings.policy
        if policy is RouterPolicy.PREFIX and request.method == b"POST":
            key = affinity.prompt_prefix(request.body, self.settings.prefix_chars)
        elif policy is RouterPolicy.SESSION:
            key = affinity.session_key(request.headers, self._session_header, request.body)
        else:
            return None
        return None if key is None else affinity.key_hash(key)

    def stalled(self, now: float) -> dict[int, tuple[float, int]]:
        """Ranks that hold requests and have sent nothing back for --stall-timeout: rank ->
        (seconds quiet, requests held)."""
        after = self.settings.stall_timeout
        if after <= 0:
            return {}
        quiet = {rank: (a.quiet_for(now), len(a.inflight)) for rank, a in self.activity.items() if a.inflight}
        return {rank: q for rank, q in quiet.items() if q[0] >= after}

    async def pick(self, tried: Collection[int], deadline: float, key: int | None = None) -> int | None:
        """A ready rank this request has not failed on; waits for one until `deadline`."""
        while True:
            rank = self.balancer.choose(self._ranks, tried, key)
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
        key = self.affinity_key(request)
        while True:
            rank = await self.pick(tried, request.received + s.queue_timeout, key)
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
        activity = self.activity.get(rank)
        if activity is None:
            activity = self.activity[rank] = Activity()
        exchange = Exchange(client, request, rank, activity)
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
        if client.writable.is_set():
            exchange.watch()
        else:
            upstream.pause()
        try:
            outcome = await exchange.done
        finally:
            client.exchange = None
            exchange.unwatch()
        if outcome is Outcome.COMPLETE:
            self.pool.release(upstream)
        else:
            upstream.close()
        return outcome, exchange
