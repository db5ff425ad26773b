"""One request's life through a worker, in phases: pick a rank (the policy) → send it (an
exchange) → on its outcome, one step (`next_step`): retry, continue, cut or complete → record it
(the counters, the trace). A `Passage` holds what the life carries between phases: the ranks
tried, the retries spent, the resumable stream, the trace. The router (proxy.py) holds only what
requests share.

The retry rule never duplicates work a client could see: a request that never reached a rank
(the connection failed) goes to another rank whatever it is; one whose rank failed before the
first byte of its answer went out goes again only if it is stateless (routes.RESENDABLE); once a
byte went out it is never sent again: a resumable stream continues on another rank from the
tokens it had (continuation.py), whatever cut it (its rank died, was killed as hung, or was
handed off by a planned stop), as many times as --router-retries allows; any other answer is cut
as cleanly as it can be: an SSE stream with an error event and its end marker, anything else by
closing the connection.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import time
from collections.abc import Callable

from vllm_dp_supervisor.router import continuation, control, pod_metrics, responses
from vllm_dp_supervisor.router.cached_tokens import CachedTokens
from vllm_dp_supervisor.router.client import ClientConnection, Request
from vllm_dp_supervisor.router.exchange import Exchange, Outcome
from vllm_dp_supervisor.router.proxy import CONTINUATION_PATH, Router
from vllm_dp_supervisor.router.routes import (
    GEN_AI_OPERATIONS,
    body_json,
    error_response,
    family,
    resendable,
    route,
    sse_error_event,
    upstream_request,
)
from vllm_dp_supervisor.router.stream import Stream

WHOLE_POINTS = 16  # chunk ends tried, latest first, for one whose text is whole
SUFFIX_CHARS = 16  # how much of the stream's text a point's decoded text must end with


class Step(enum.Enum):
    COMPLETE = "complete"  # the answer is whole
    GONE = "gone"  # the client went away
    RETRY = "retry"  # nothing went out: send it again, to another rank
    FAIL = "fail"  # nothing went out, and it may not be sent again: a 502
    CONTINUE = "continue"  # a resumable stream was cut: the rest from another rank
    CUT = "cut"  # an answer under way ends here, as cleanly as it can


def next_step(outcome: Outcome, sent: bool, resumable: bool, resendable: bool, retries_left: bool) -> Step:
    """What follows an exchange. `sent`: a byte of its answer went out; `resumable`: the request
    streams with a plan to continue it; `resendable`: its endpoint is stateless. Pure: the table
    tests/unit/router/test_passage.py checks."""
    if outcome is Outcome.CLIENT_GONE:
        return Step.GONE
    if outcome is Outcome.COMPLETE:
        return Step.COMPLETE
    if sent:
        return Step.CONTINUE if resumable else Step.CUT
    if retries_left and (outcome is Outcome.UNREACHABLE or resendable):
        return Step.RETRY
    return Step.FAIL


class Passage:
    def __init__(self, router: Router, client: ClientConnection, request: Request) -> None:
        self.router, self.client, self.request = router, client, request
        self.settings = router.settings
        self.trace = request.trace
        self.endpoint = family(request.path)
        self.tried: set[int] = set()  # ranks this request failed on before a byte went out
        self.retries = 0
        plan = continuation.plan(request, self.settings.resume, self.settings.force_usage)
        self.stream = Stream(plan) if plan is not None else None
        self.data = upstream_request(request, client.peer, body=None if plan is None else plan.upstream_body())
        self.usage: CachedTokens | None = None  # what the rank that answered said of its usage

    async def run(self) -> bool:
        """Answer the request; False when the client's connection must close."""
        tracing = self.router.tracing
        if tracing is None:
            return await self._run()
        request = self.request
        operation = GEN_AI_OPERATIONS.get(self.endpoint) if request.method == b"POST" else None
        model = (request.json() or {}).get("model") if operation is not None else None
        self.trace = request.trace = tracing.request(
            request.method, request.path, request.headers, request.received, http11=request.http11,
            route=route(request.path, control.PATHS), operation=operation,
            model=model if isinstance(model, str) else None)
        try:
            return await self._run()
        finally:
            self._traced_usage()
            self.trace.end()

    async def _run(self) -> bool:
        request, s = self.request, self.settings
        if (kept := await self._not_routed()) is not None:
            return kept
        rid = responses.named(request)  # a stored response's follow-up, retrieval or cancel: to its rank
        holder = None if rid is None else await responses.holder(self.router, request, rid, self.client.peer)
        while True:
            rank = await self.router.pick(request, self.tried, request.received + s.queue_timeout, self.trace,
                                          holder)
            if rank is None:
                return self._no_rank()
            predicted = self.router.policy.predicted if s.prompt_details else None  # this pick's, read at once
            outcome, exchange = await self.router.send(self.client, request, self.data, rank, self.stream,
                                                       read_cached=predicted is not None or self.trace is not None)
            if self.trace is not None:  # a failure before bytes went out: the 502 below, or a retry
                self.trace.answered(exchange.status or 502, client_gone=outcome is Outcome.CLIENT_GONE)
            step = next_step(outcome, exchange.sent, exchange.stream is not None, resendable(request.path),
                             self.retries < s.retries)
            if step is Step.GONE:
                return False
            if step in (Step.COMPLETE, Step.CONTINUE, Step.CUT):
                self._answered(exchange, predicted)
            if step is Step.COMPLETE:
                return not exchange.close_after
            if step is Step.CONTINUE:
                return await self._continue(exchange)
            if step is Step.CUT:
                return self._cut(exchange)
            self.tried.add(rank)
            if exchange.engine_dead:  # the supervisor probes it at once: its /health says 503 now
                self.router.report_unreachable(rank, exchange.attempt, exchange.why)
            if step is Step.RETRY:
                self._retry(outcome)
                continue
            return self._fail(rank, exchange)

    async def _not_routed(self) -> bool | None:
        """What the router answers itself, not one rank: the pod's /metrics (pod_metrics.py) and
        vLLM's control endpoints (control.py: answered from every rank, or refused). None: the
        request is routed."""
        request, client, at = self.request, self.client, self.settings.metrics_at
        if at is not None and pod_metrics.asks_for_metrics(request.method, request.path):
            return await pod_metrics.answer(client, request, at)
        how = control.kind(request.method, request.path)
        if how is None:
            return None
        if how == "fan out":
            return await control.answer(self.router, client, request)
        ports = {rank: port for rank, (port, _) in self.router.ready.items()}
        close = client.closing or not request.keep_alive
        client.write(control.refusal(request.method, request.path, ports, close=close))
        return not close

    # ---- the steps ----

    def _retry(self, outcome: Outcome) -> None:
        self.retries += 1
        if self.stream is not None:  # nothing of it went out: the next rank's answer starts afresh
            self.stream = Stream(self.stream.plan)
        stats = self.router.stats
        stats.retries["unreachable" if outcome is Outcome.UNREACHABLE else "rank_failed"] += 1
        if outcome is not Outcome.UNREACHABLE:
            stats.resumed["request"] += 1  # its rank failed before a byte went out: sent again

    def _fail(self, rank: int, exchange: Exchange) -> bool:
        self._record(rank, 502, None)
        self.client.write(error_response(502, "Bad Gateway", f"the model server (rank {rank}) failed before "
                                         f"answering: {exchange.why}", "server_error", close=self.client.closing))
        return self.request.keep_alive and not self.client.closing

    def _no_rank(self) -> bool:
        self.router.stats.no_rank += 1
        if self.trace is not None:
            self.trace.answered(503)
        self.client.write(error_response(503, "Service Unavailable", "no model server is ready; retry later",
                                         "service_unavailable", retry_after=1, close=self.client.closing))
        return self.request.keep_alive and not self.client.closing

    def _cut(self, exchange: Exchange) -> bool:
        """End an answer whose rank failed after its first byte went out, as cleanly as possible:
        a stream with an OpenAI-shaped error event and [DONE], anything else by closing."""
        rank = exchange.rank
        self.router.stats.cut_streams[str(rank)] += 1
        if self.trace is not None:
            self.trace.cut(f"rank {rank} failed mid-answer: {exchange.why}")
        if exchange.sse and exchange.chunked:
            event = sse_error_event(f"the model server (rank {rank}) failed mid-answer: {exchange.why}")
            self.client.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(event), event))
            return not exchange.close_after
        return False

    async def _continue(self, cut: Exchange) -> bool:
        """The rest of the stream `cut` left, from other ranks, until it is whole or cannot go on:
        from a point whose text is whole (seam.py), within the client's limit (or the context's)."""
        stream, s, router = cut.stream, self.settings, self.router
        assert stream is not None
        failed = {(cut.rank, cut.attempt)}  # a rank that failed it may take it again once restarted
        last, cuts = cut, 0
        while True:
            cut_at = time.monotonic()
            if stream.done or stream.finish is not None:  # cut after its last token: finish, regenerate nothing
                self.client.write(cut.frame(stream.end()) + (b"0\r\n\r\n" if cut.chunked else b""))
                return not cut.close_after
            if stream.diverged is not None:
                last.why += f"; {stream.diverged}"
                return self._cut(last)
            if stream.prompt_ids is None or cuts >= s.retries:
                return self._cut(last)
            cuts += 1
            ids = [*stream.prompt_ids, *stream.generated]
            placing = dataclasses.replace(self.request, url=CONTINUATION_PATH, path=CONTINUATION_PATH,
                                          body=json.dumps({"prompt": ids}).encode())
            rank = await router.pick(placing, router.still_failed(failed), cut_at + s.queue_timeout)
            if rank is None:
                last.why += "; no other rank ready to continue it"
                return self._cut(last)
            defaults = await router.generation_defaults()
            inexact = continuation.against_defaults(stream.plan, defaults)
            if inexact is not None:
                last.why += f"; {inexact}"
                return self._cut(last)
            assert not isinstance(defaults, str)
            point = await self._whole_point(rank, stream)
            context = None if stream.plan.max_tokens is not None else await self._context(rank)
            body = None if point is None else continuation.body(stream.plan, stream.prompt_ids,
                                                                stream.generated[:point[0]], context,
                                                                ahead=s.priority_scheduling,
                                                                default_max=defaults.get("max_tokens"),
                                                                cap=defaults.get("override_max_tokens"))
            if body is None:
                last.why += "; " + ("no point of the answer that rank decodes whole" if point is None else
                                    "the model's context length is not known to set the rest's limit")
                return self._cut(last)
            assert point is not None
            stream.seam.resume_at(point, stream.generated)
            stream.restart()
            rest = dataclasses.replace(self.request, url=CONTINUATION_PATH, path=CONTINUATION_PATH, body=body)
            data = upstream_request(rest, self.client.peer)
            outcome, exchange = await router.send(self.client, self.request, data, rank, stream, continuation=True,
                                                  on_first_out=self._went_on(last.rank, rank, len(stream.generated),
                                                                             cut_at))
            if outcome is Outcome.COMPLETE:
                return not cut.close_after
            if outcome is Outcome.CLIENT_GONE:
                return False
            failed.add((rank, exchange.attempt))
            exchange.why = exchange.why or f"the continuation was refused (HTTP {exchange.status})"
            last = exchange if exchange.first_out is not None else last

    async def _whole_point(self, rank: int, stream: Stream) -> tuple[int, int] | None:
        """The latest chunk end whose tokens `rank` decodes whole (its text not ending in U+FFFD,
        vLLM's own sign of bytes held back, and ending with what the stream had sent there):
        (tokens, characters read). None when none of the last WHOLE_POINTS is, or the rank does
        not say."""
        for point in stream.seam.points(WHOLE_POINTS):
            if point[0] == 0:
                return point  # nothing generated: the prompt is whole
            ask = {"tokens": stream.generated[:point[0]]}
            if isinstance(stream.plan.request.get("model"), str):
                ask["model"] = stream.plan.request["model"]
            answer = await self._ask(b"POST", b"/detokenize", json.dumps(ask).encode(), rank)
            text = answer.get("prompt") if answer is not None else None
            if not isinstance(text, str):
                return None
            read = stream.seam.text[:point[1]][-SUFFIX_CHARS:]
            # /detokenize keeps special tokens the stream skipped: bytes held back before one end in
            # U+FFFD then the token's text, so the decoded text must also end with what the stream
            # had sent (else an earlier point: at worst the start, all of it generated again)
            if not text.endswith("\ufffd") and text.endswith(read):
                return point
        return None

    async def _context(self, rank: int) -> int | None:
        """The model's max_model_len, as the rank's /v1/models says (kept: every rank serves the same)."""
        if self.router.context is None:
            answer = await self._ask(b"GET", b"/v1/models", b"", rank)
            models = answer.get("data") if answer is not None else None
            length = models[0].get("max_model_len") if isinstance(models, list) and models and \
                isinstance(models[0], dict) else None
            if isinstance(length, int) and not isinstance(length, bool) and length > 0:
                self.router.context = length
        return self.router.context

    async def _ask(self, method: bytes, path: bytes, body: bytes, rank: int) -> dict | None:
        """A side request to `rank` with the client's headers (an API key goes with it): its JSON."""
        side = dataclasses.replace(self.request, method=method, url=path, path=path, body=body)
        answer = await self.router.ask(rank, upstream_request(side, self.client.peer))
        if answer is None or answer[0] != 200:
            return None
        return body_json(answer[1])

    def _went_on(self, cut_rank: int, to: int, tokens: int, since: float) -> Callable[[float], None]:
        def going_on(when: float) -> None:
            """The continuation's first byte went out: the stream goes on."""
            stats = self.router.stats
            stats.resumed["stream"] += 1
            if self.trace is not None:
                self.trace.resumes += 1
            stats.resume_gap.observe(when - since)
            self.router.report_resumed(cut_rank, to, tokens, when - since)
        return going_on

    def _answered(self, exchange: Exchange, predicted: int | None) -> None:
        """The rank answered (whole or not): counted; the tokens it says its prefix cache hit
        (if it said) set beside those the policy predicted."""
        self._record(exchange.rank, exchange.status, exchange.ttfb)
        self.usage = exchange.cached
        cached = exchange.cached.value if exchange.cached is not None else None
        if predicted is not None and cached is not None:
            self.router.policy.checked(exchange.rank, predicted, cached)
            if self.trace is not None:
                self.trace.cache_checked(predicted, cached)

    def _traced_usage(self) -> None:
        """The answer's token counts on its span: a resumable stream's as the client read them
        (its prompt, the whole generation, continuations included), else the rank's usage."""
        assert self.trace is not None
        stream, usage = self.stream, self.usage
        if stream is not None and stream.prompt_ids is not None:
            self.trace.usage(len(stream.prompt_ids), len(stream.generated), usage.value if usage else None)
        elif usage is not None:
            self.trace.usage(usage.prompt, usage.completion, usage.value)

    def _record(self, rank: int, status: int, ttfb: float | None) -> None:
        self.router.stats.observe(rank, status, self.endpoint, ttfb, time.monotonic() - self.request.received)
