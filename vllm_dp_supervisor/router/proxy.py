"""One request through a worker: pick a ready rank, send it, stream the answer back; on a rank's
failure, send it again, continue it, or answer the error an OpenAI client expects.

The retry rule never duplicates work a client could see: a request that never reached a rank
(the connection failed) goes to another rank whatever it is; one whose rank died before the
first byte of its answer went out goes again only if it is stateless (routes.RESENDABLE); once a
byte went out it is never sent again: a resumable stream (resume.py) continues on another rank
from the tokens it had (carry.py), and any other answer ends as cleanly as it can: an SSE stream
with an error event and its end marker, anything else by closing the connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING

from vllm_dp_supervisor.router import affinity, pod_metrics, resume
from vllm_dp_supervisor.router.activity import Activity
from vllm_dp_supervisor.router.balance import Balancer, Placer
from vllm_dp_supervisor.router.carry import carry_on
from vllm_dp_supervisor.router.client import ClientConnection, Request
from vllm_dp_supervisor.router.exchange import Exchange, Outcome
from vllm_dp_supervisor.router.routes import (
    error_response,
    family,
    resendable,
    sse_error_event,
    upstream_request,
    with_trace,
)
from vllm_dp_supervisor.router.stats import WorkerStats
from vllm_dp_supervisor.router.stream import Stream
from vllm_dp_supervisor.router.upstream import Pool
from vllm_dp_supervisor.settings.config import RouterPolicy, RouterSettings

if TYPE_CHECKING:
    from vllm_dp_supervisor.kvcache import CacheRouting
    from vllm_dp_supervisor.router.tracing import RequestTrace, Tracing


class Router:
    """A worker's routing: the ready ranks as the supervisor last published them, its own
    in-flight counts, its connections to the ranks."""

    def __init__(self, settings: RouterSettings, stats: WorkerStats,
                 report_unreachable: Callable[[int, int, str], None], report_load: Callable[[], None],
                 report_resumed: Callable[[int, int, int, float], None], cache: CacheRouting | None = None,
                 tracing: Tracing | None = None) -> None:
        """`report_unreachable(rank, attempt, why)`: a rank it could not connect to;
        `report_load()`: its view and in-flight counts changed; `report_resumed(from, to, tokens,
        gap)`: a stream continued on another rank (worker.py sends them all). `cache`: the cache
        policy's placement (kvcache), under that policy only. `tracing`: the spans, under
        --otlp-traces-endpoint only."""
        if (cache is None) != (settings.policy is not RouterPolicy.CACHE):
            raise ValueError("the cache policy needs its CacheRouting, and no other policy takes one")
        self.settings = settings
        self.cache = cache
        self.tracing = tracing
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
        self.report_resumed = report_resumed
        self.held: dict[int, set[Exchange]] = {}  # per rank: the answers under way (for a hand-off)

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

    def still_failed(self, failed: Collection[tuple[int, int]]) -> set[int]:
        """The ranks among `failed` (rank, attempt) still at that attempt: a restarted one is new."""
        return {rank for rank, attempt in failed if rank in self.ready and self.ready[rank][1] == attempt}

    def placer(self, path: bytes, body: bytes) -> Placer | None:
        """How the cache policy places this request among candidates (timed); None under another."""
        cache = self.cache
        if cache is None:
            return None
        text = path.split(b"?", 1)[0].decode(errors="replace")
        lookup = self.stats.cache_lookup

        def place(candidates: Sequence[int], inflight: Mapping[int, int]) -> int | None:
            started = time.perf_counter()
            try:
                return cache.place(text, body, candidates, inflight)
            finally:
                lookup.observe(time.perf_counter() - started)
        return place

    async def pick(self, tried: Collection[int], deadline: float, key: int | None = None,
                   placer: Placer | None = None, trace: RequestTrace | None = None) -> int | None:
        """A ready rank this request has not failed on; waits for one until `deadline` (the
        wait is the request's queue time on its `trace`)."""
        while True:
            rank = self.balancer.choose(self._ranks, tried, key, placer)
            if rank is not None:
                return rank
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            waited = time.monotonic()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return None
            finally:
                if trace is not None:
                    trace.queued_s += time.monotonic() - waited

    async def handle(self, client: ClientConnection, request: Request) -> bool:
        """Answer one request; False when the client's connection must close."""
        if self.tracing is None:
            return await self._handle(client, request)
        trace = request.trace = self.tracing.request(request.method, request.path, request.headers, request.received)
        try:
            return await self._handle(client, request)
        finally:
            trace.end()

    async def _handle(self, client: ClientConnection, request: Request) -> bool:
        s, endpoint, retries, trace = self.settings, family(request.path), 0, request.trace
        if s.metrics_at is not None and pod_metrics.asks_for_metrics(request.method, request.path):
            return await pod_metrics.answer(client, request, s.metrics_at)
        tried: set[int] = set()
        plan = resume.plan(request.path, request.body, s.resume) if request.method == b"POST" else None
        stream = Stream(plan) if plan is not None else None
        data = upstream_request(request, client.peer, body=None if plan is None else plan.upstream_body())
        key = self.affinity_key(request)
        placer = self.placer(request.path, request.body) if request.method == b"POST" else None
        while True:
            rank = await self.pick(tried, request.received + s.queue_timeout, key, placer, trace)
            if rank is None:
                return self._no_rank(client, request)
            outcome, exchange = await self.send(client, request, data, rank, stream)
            duration = time.monotonic() - request.received
            if trace is not None:  # a failure before bytes went out: the 502 below, or a retry
                trace.answered(exchange.status or 502, client_gone=outcome is Outcome.CLIENT_GONE)
            if outcome is Outcome.CLIENT_GONE:
                return False
            if outcome is Outcome.COMPLETE:
                self.stats.observe(rank, exchange.status, endpoint, exchange.ttfb, duration)
                return not exchange.close_after
            if exchange.sent:  # bytes went out: never sent again; continued, or ended cleanly
                self.stats.observe(rank, exchange.status, endpoint, exchange.ttfb, duration)
                if exchange.stream is not None:
                    return await carry_on(self, client, request, exchange)
                return self.cut(client, exchange, rank)
            tried.add(rank)
            if exchange.engine_dead:  # the supervisor probes it at once: its /health says 503 now
                self._report_unreachable(rank, exchange.attempt, exchange.why)
            if retries < s.retries and (outcome is Outcome.UNREACHABLE or resendable(request.path)):
                retries += 1
                self.stats.retries["unreachable" if outcome is Outcome.UNREACHABLE else "rank_failed"] += 1
                if outcome is not Outcome.UNREACHABLE:
                    self.stats.resumed["request"] += 1  # its rank died before a byte went out: sent again
                continue
            self.stats.observe(rank, 502, endpoint, None, duration)
            client.write(error_response(502, "Bad Gateway", f"the model server (rank {rank}) failed before "
                                        f"answering: {exchange.why}", "server_error", close=client.closing))
            return request.keep_alive and not client.closing

    def _no_rank(self, client: ClientConnection, request: Request) -> bool:
        self.stats.no_rank += 1
        if request.trace is not None:
            request.trace.answered(503)
        client.write(error_response(503, "Service Unavailable", "no model server is ready; retry later",
                                    "service_unavailable", retry_after=1, close=client.closing))
        return request.keep_alive and not client.closing

    def cut(self, client: ClientConnection, exchange: Exchange, rank: int) -> bool:
        """End an answer whose rank failed after its first byte went out, as cleanly as possible:
        a stream with an OpenAI-shaped error event and [DONE], anything else by closing."""
        self.stats.cut_streams[str(rank)] += 1
        if exchange.request.trace is not None:
            exchange.request.trace.cut(f"rank {rank} failed mid-answer: {exchange.why}")
        if exchange.sse and exchange.chunked:
            event = sse_error_event(f"the model server (rank {rank}) failed mid-answer: {exchange.why}")
            client.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(event), event))
            return not exchange.close_after
        return False

    def hand_off(self, ranks: Collection[int]) -> int:
        """A planned stop of `ranks`: their streams that can continue elsewhere end there now, and
        continue on another rank. How many were handed off."""
        handed = [e for r in ranks for e in list(self.held.get(r, ())) if e.sent and e.stream is not None
                  and e.stream.resumable]
        for exchange in handed:
            exchange.hand_off()
        return len(handed)

    async def send(self, client: ClientConnection, request: Request, data: bytes, rank: int,
                   stream: Stream | None, *, continuation: bool = False,
                   on_first_out: Callable[[float], None] | None = None) -> tuple[Outcome, Exchange]:
        """One exchange with `rank`, counted in flight while it lasts."""
        port, attempt = self.ready[rank]
        exchange = Exchange(client, request, rank, attempt, self._activity(rank), stream, continuation=continuation,
                            on_first_out=on_first_out)
        span = None
        if request.trace is not None:
            tokens = len(stream.generated) if continuation and stream is not None else None
            span, lines = request.trace.attempt(rank, attempt, port, tokens)
            data = with_trace(data, lines)
        self.balancer.started(rank)
        try:
            return await self._exchange(client, request, data, rank, port, attempt, exchange)
        finally:
            self.balancer.finished(rank)
            if rank not in self.ready:
                self._report_load()
            if span is not None:
                request.trace.attempt_ended(span, exchange.status or None, exchange.why or None)

    def _activity(self, rank: int) -> Activity:
        activity = self.activity.get(rank)
        if activity is None:
            activity = self.activity[rank] = Activity()
        return activity

    async def _exchange(self, client: ClientConnection, request: Request, data: bytes, rank: int, port: int,
                        attempt: int, exchange: Exchange) -> tuple[Outcome, Exchange]:
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
        held = self.held.setdefault(rank, set())
        held.add(exchange)
        if client.writable.is_set():
            exchange.watch()
        else:
            upstream.pause()
        try:
            outcome = await exchange.done
        finally:
            held.discard(exchange)
            client.exchange = None
            exchange.unwatch()
        if outcome is Outcome.COMPLETE and not upstream.closed:
            self.pool.release(upstream)
        else:
            upstream.close()
        return outcome, exchange
