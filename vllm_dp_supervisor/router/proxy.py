"""What a worker's requests share (`Router`): the ready ranks as the supervisor last published
them, the policy that picks among them, the connections to them, what each rank holds and when it
last sent a byte, and the answers under way per rank (for a hand-off). One request's life is a
`passage.Passage`, which drives the router: the router sends its exchanges and counts them in and
out of the load, and knows nothing of a request's life.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from vllm_dp_supervisor.kvcache import model_files
from vllm_dp_supervisor.router.activity import Activity
from vllm_dp_supervisor.router.client import ClientConnection, Request
from vllm_dp_supervisor.router.exchange import Exchange, Outcome
from vllm_dp_supervisor.router.policies import Policy
from vllm_dp_supervisor.router.responses import Holders
from vllm_dp_supervisor.router.routes import with_trace
from vllm_dp_supervisor.router.stats import WorkerStats
from vllm_dp_supervisor.router.stream import Stream
from vllm_dp_supervisor.router.upstream import Connections, Pool
from vllm_dp_supervisor.settings.config import RouterSettings

if TYPE_CHECKING:
    from vllm_dp_supervisor.router.tracing import RequestTrace, Tracing


ASK_TIMEOUT_S = 10.0  # a side request to a rank (/detokenize, /v1/models): small answers, no generation
ASK_MAX_BYTES = 1 << 20


CONTINUATION_PATH = b"/v1/completions"  # where a continuation goes (passage.py)


def error_type(exchange: Exchange) -> str | None:
    """What failed an exchange, low in cardinality (a span's error.type); None when it did not."""
    if not exchange.why:
        return None
    if exchange.why.startswith("cannot connect") or "before the request was sent" in exchange.why:
        return "unreachable"
    return "handed_off" if exchange.why.startswith("handed off") else "rank_failed"


class Answer:
    """A short answer from a rank, kept whole (the sink of a side request); or its status only."""

    def __init__(self, status_only: bool = False) -> None:
        self.status = 0
        self.data = bytearray()
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._status_only = status_only

    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        if self._status_only:
            self.complete()

    def body(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > ASK_MAX_BYTES:
            self.lost("too long")

    def complete(self) -> None:
        if not self.done.done():
            self.done.set_result(True)

    def flush(self) -> None:
        pass

    def lost(self, why: str) -> None:
        if not self.done.done():
            self.done.set_result(False)


class Router:
    def __init__(self, settings: RouterSettings, stats: WorkerStats, policy: Policy,
                 report_unreachable: Callable[[int, int, str], None], report_load: Callable[[], None],
                 report_resumed: Callable[[int, int, int, float], None], tracing: Tracing | None = None,
                 pool: Connections | None = None) -> None:
        """`report_unreachable(rank, attempt, why)`: a rank it could not connect to;
        `report_load()`: its view and in-flight counts changed; `report_resumed(from, to, tokens,
        gap)`: a stream continued on another rank (worker.py sends them all). `tracing`: the
        spans, under --otlp-traces-endpoint only. `pool`: the connections to the ranks."""
        self.settings = settings
        self.stats = stats
        self.policy = policy
        self.load = policy.load
        self.tracing = tracing
        self.pool: Connections = Pool(settings.host) if pool is None else pool
        self.ready: dict[int, tuple[int, int]] = {}  # rank -> (port, attempt)
        self.activity: dict[int, Activity] = {}  # per rank: what it holds, when it last sent a byte
        self.held: dict[int, set[Exchange]] = {}  # per rank: the answers under way (for a hand-off)
        self._ranks: list[int] = []  # the keys of `ready`, sorted once per view, not per request
        self._changed = asyncio.Event()
        self.report_unreachable = report_unreachable
        # Told on every view and whenever a request ends on a rank out of rotation: the supervisor
        # waits on it to stop a drained rank as soon as its last request is done.
        self._report_load = report_load
        self.report_resumed = report_resumed
        self.context: int | None = None  # the model's max_model_len, once a rank said it
        self._generation: dict[str, Any] | None = None  # vLLM's request defaults, once read
        self.holders = Holders()  # which rank holds each stored response this worker found (responses.py)

    async def generation_defaults(self) -> dict[str, Any] | str:
        """What vLLM applies to a request that does not set it (model_files.generation_defaults),
        read off the event loop once; a string says why it cannot be known (asked again next time:
        the model may be in the hub cache by then)."""
        if self._generation is None:
            if self.settings.model is None:
                return "the model is not known"
            try:
                self._generation = await asyncio.to_thread(model_files.generation_defaults, self.settings.model,
                                                           dict(os.environ))
            except model_files.ModelFilesError as exc:
                return str(exc)
        return self._generation

    def update(self, ready: dict[int, tuple[int, int]]) -> None:
        """A new view: these ranks are ready, at these ports and attempts."""
        self.ready = ready
        self._ranks = sorted(ready)
        self.pool.retain(frozenset((rank, attempt) for rank, (_, attempt) in ready.items()))
        self._changed.set()
        self._changed = asyncio.Event()
        self._report_load()

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

    async def pick(self, request: Request, tried: Collection[int], deadline: float,
                   trace: RequestTrace | None = None, holder: int | None = None) -> int | None:
        """A ready rank for `request` that it has not failed on, by the policy; waits for one until
        `deadline` (the wait is the request's queue time on its `trace`). `holder`: the rank
        that holds what the request names (responses.py), if it is still a candidate."""
        while True:
            candidates = [r for r in self._ranks if r not in tried] if tried else self._ranks
            if holder is not None and holder in candidates:
                self.policy.predicted = None  # not the policy's pick: nothing it predicted
                return holder
            if candidates:
                return self.policy.pick(request, candidates)
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
                   on_first_out: Callable[[float], None] | None = None,
                   read_cached: bool = False) -> tuple[Outcome, Exchange]:
        """One exchange with `rank`, counted in its load while it lasts."""
        port, attempt = self.ready[rank]
        exchange = Exchange(client, request, rank, attempt, self._activity(rank), stream, continuation=continuation,
                            on_first_out=on_first_out, read_cached=read_cached)
        span = None
        if request.trace is not None:
            tokens = len(stream.generated) if continuation and stream is not None else None
            span, lines = request.trace.attempt(rank, attempt, port, tokens, method=request.method,
                                                path=CONTINUATION_PATH if continuation else request.url,
                                                host=self.settings.host)
            data = with_trace(data, lines)
        self.load.started(rank)
        try:
            return await self._exchange(client, request, data, rank, port, attempt, exchange)
        finally:
            self.load.finished(rank)
            if rank not in self.ready:
                self._report_load()
            if span is not None:
                request.trace.attempt_ended(span, exchange.status or None, exchange.why or None,
                                            error_type(exchange))

    async def ask(self, rank: int, data: bytes, timeout: float = ASK_TIMEOUT_S,
                  status_only: bool = False) -> tuple[int, bytes] | None:
        """A side request to `rank` (a continuation's /detokenize, /v1/models, a control endpoint's):
        its status and body, or None when the rank did not answer whole within `timeout`.
        `status_only`: its status once its head is in (the body is not read: the connection closes)."""
        if rank not in self.ready:
            return None
        port, attempt = self.ready[rank]
        try:
            conn = await self.pool.acquire(rank, port, attempt)
        except (OSError, TimeoutError):
            return None
        answer = Answer(status_only)
        if not conn.send(data, answer, head_only=False):
            conn.close()
            return None
        try:
            whole = await asyncio.wait_for(asyncio.shield(answer.done), timeout)
        except TimeoutError:
            whole = False
        if whole and not conn.closed and not status_only:
            self.pool.release(conn)
        else:
            conn.close()
        return (answer.status, bytes(answer.data)) if whole else None

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
            self.report_unreachable(rank, attempt, exchange.why)  # the supervisor decides what it means
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
