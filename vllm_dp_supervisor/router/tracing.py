"""OpenTelemetry spans for the requests a router worker answers, under --otlp-traces-endpoint.

Per request, a SERVER span (a child of the client's `traceparent`, if it sent one) from the
moment its last byte arrived to the end of its answer: the rank that answered, how long it waited
for a ready rank, how many times it was sent again and how many times its stream was continued.
Under it, a CLIENT span per exchange with a rank (a first try, a retry, a continuation); the rank
is sent that span's `traceparent`, so a rank started with vLLM's own --otlp-traces-endpoint files
its spans under it. The spans leave in batches on the SDK's own thread (OTLP over gRPC, or
HTTP/protobuf with OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, as vLLM reads it).

Must never: be imported when tracing is off (a worker without it loads no OpenTelemetry and pays
one `is None` per request), block the worker's loop on the collector, or put a header's or a
body's content on a span but the model's name and the token counts (prompts and keys stay out).

Names and attributes follow OpenTelemetry's HTTP and GenAI semantic conventions: a span is named
by its method and route (routes.route: the paths vLLM serves, never an unbounded one), error.type
says what failed in few words, gen_ai.* what was asked of which model and how many tokens.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from vllm_dp_supervisor.settings.config import OTLP_EXPORTERS, OTLP_PROTOCOL_ENV

SERVICE = "vllm-dp-supervisor"
FLUSH_S = 3.0  # at the worker's exit, what the last batch gets: the pod's stop does not wait on a collector
ATTR = "vllm_dp_supervisor."  # our attributes' namespace
# OpenTelemetry's HTTP conventions: a method not among these is "_OTHER" (with the original beside it)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
GEN_AI_PROVIDER = "vllm"

_PROPAGATOR = TraceContextTextMapPropagator()


def exporter(endpoint: str, environ: Mapping[str, str]) -> SpanExporter:
    """The OTLP exporter vLLM would make for `endpoint` (the same protocol variable, the same
    gRPC default); the SDK reads the other OTEL_EXPORTER_OTLP_* variables (headers, timeout)."""
    protocol = environ.get(OTLP_PROTOCOL_ENV, "grpc")
    module = OTLP_EXPORTERS.get(protocol)
    if module is None:
        raise ValueError(f"{OTLP_PROTOCOL_ENV}={protocol!r}: must be one of {', '.join(OTLP_EXPORTERS)}")
    otlp = importlib.import_module(module).OTLPSpanExporter
    if protocol == "grpc":  # plain gRPC unless the URL says TLS, as vLLM connects
        return otlp(endpoint=endpoint, insecure=not endpoint.startswith("https://"))
    return otlp(endpoint=endpoint)


class Tracing:
    """A worker's tracer. `processor`: where finished spans go (a batch to the collector; a
    test's in-memory list)."""

    def __init__(self, processor: SpanProcessor, environ: Mapping[str, str]) -> None:
        attributes: dict[str, str | int] = {"process.pid": os.getpid()}
        if "OTEL_SERVICE_NAME" not in environ:
            attributes["service.name"] = SERVICE  # else the SDK's resource detector names it
        self._provider = TracerProvider(resource=Resource.create(attributes))
        self._provider.add_span_processor(processor)
        self._tracer = self._provider.get_tracer("vllm_dp_supervisor.router")

    @classmethod
    def to_collector(cls, endpoint: str, environ: Mapping[str, str]) -> Tracing:
        return cls(BatchSpanProcessor(exporter(endpoint, environ)), environ)

    def request(self, method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], received: float, *,
                route: str | None = None, http11: bool = True, operation: str | None = None,
                model: str | None = None) -> RequestTrace:
        """The server span of a request whose last byte came at `received` (monotonic), named and
        described per OpenTelemetry's HTTP server conventions: `route` (routes.route) names it,
        else its method alone; `operation`, `model`: its GenAI operation and requested model."""
        carrier = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in headers
                   if name.lower() in (b"traceparent", b"tracestate")}
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        verb = method.decode("latin-1")
        known = verb if verb in METHODS else "_OTHER"
        attributes: dict[str, str | int] = {
            "http.request.method": known, "url.scheme": "http", "url.path": path.split(b"?", 1)[0].decode("latin-1"),
            "network.protocol.version": "1.1" if http11 else "1.0"}
        if verb not in METHODS:
            attributes["http.request.method_original"] = verb
        if route is not None:
            attributes["http.route"] = route
        if operation is not None:
            attributes.update({"gen_ai.operation.name": operation, "gen_ai.provider.name": GEN_AI_PROVIDER})
            if model:
                attributes["gen_ai.request.model"] = model
        start = time.time_ns() - int((time.monotonic() - received) * 1e9)
        span = self._tracer.start_span(f"{known} {route}" if route is not None else known, context=parent,
                                       kind=SpanKind.SERVER, start_time=start, attributes=attributes)
        return RequestTrace(self._tracer, span, route)

    def close(self) -> None:
        """Send what is left, for at most FLUSH_S (on a thread of its own: an exporter retrying
        an unreachable collector must not hold up the worker's exit)."""
        closer = threading.Thread(target=self._provider.shutdown, daemon=True)
        closer.start()
        closer.join(FLUSH_S)


def _header_lines(context: Context) -> bytes:
    """The trace context headers (traceparent, tracestate) of `context`, as CRLF-ended lines."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context)
    return b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in carrier.items())


class RequestTrace:
    """One request's spans, told what happened to it by its passage (passage.py)."""

    def __init__(self, tracer: trace.Tracer, span: Span, route: str | None = None) -> None:
        self._tracer = tracer
        self._span = span
        self._route = route
        self._context: Context = trace.set_span_in_context(span)
        self.retries = 0
        self.resumes = 0
        self.queued_s = 0.0
        self.rank: int | None = None
        self.status: int | None = None
        self.error: str | None = None
        self._lines: bytes | None = None  # not sampled: the server span's context, for every exchange

    def attempt(self, rank: int, rank_attempt: int, port: int, tokens: int | None, *, method: bytes = b"POST",
                path: bytes = b"/", host: str = "127.0.0.1") -> tuple[Span, bytes]:
        """A CLIENT span for an exchange with `rank` (`tokens`: a continuation's, generated
        before; `method`, `path`: what it is sent, `host`: where), per OpenTelemetry's HTTP client
        conventions, and the header lines that make the rank's spans its children."""
        if not self._span.is_recording():  # not sampled: the rank is told so, and nothing is made
            self.rank = rank
            if self._lines is None:
                self._lines = _header_lines(self._context)
            return trace.INVALID_SPAN, self._lines
        verb = method.decode("latin-1")
        verb = verb if verb in METHODS else "_OTHER"
        path_only = path.split(b"?", 1)[0].decode("latin-1")
        attributes: dict[str, str | int | bool] = {
            "http.request.method": verb, "server.address": host, "server.port": port,
            "url.full": f"http://{host}:{port}{path_only}", ATTR + "rank": rank, ATTR + "rank_attempt": rank_attempt,
            ATTR + "continuation": tokens is not None}
        template = self._route if tokens is None else "/v1/completions"  # a continuation is a completion
        if template is not None:
            attributes["url.template"] = template
        if tokens is not None:
            attributes[ATTR + "tokens_before"] = tokens
        span = self._tracer.start_span(f"{verb} {template}" if template else verb, context=self._context,
                                       kind=SpanKind.CLIENT, attributes=attributes)
        if tokens is None and self.rank is not None:  # sent again: no byte of the last try went out
            self.retries += 1
        self.rank = rank
        return span, _header_lines(trace.set_span_in_context(span))

    @staticmethod
    def attempt_ended(span: Span, status: int | None, failed: str | None, error_type: str | None = None) -> None:
        """`failed`: why it failed (the status's description); `error_type`: its class, low in
        cardinality (OpenTelemetry's error.type: the status code, or what cut it)."""
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if status is not None and status >= 400:
            error_type = str(status)
        if error_type is not None:
            span.set_attribute("error.type", error_type)
        if failed or error_type is not None:
            span.set_status(Status(StatusCode.ERROR, failed))
        span.end()

    def answered(self, status: int, *, client_gone: bool = False) -> None:
        """What the client was answered (so far: a retry answers again); or that it went away."""
        if client_gone:
            self._span.set_attribute(ATTR + "client_gone", True)
        else:
            self.status = status

    def usage(self, prompt: int | None, completion: int | None, cached: int | None) -> None:
        """The tokens the answer counted (OpenTelemetry's gen_ai.usage.*)."""
        if self._span.is_recording():
            for name, value in (("gen_ai.usage.input_tokens", prompt), ("gen_ai.usage.output_tokens", completion),
                                ("gen_ai.usage.cache_read.input_tokens", cached)):
                if value is not None:
                    self._span.set_attribute(name, value)

    def cache_checked(self, predicted: int, cached: int) -> None:
        """The cache policy predicted `predicted` prompt tokens cached on the rank, which hit `cached`."""
        if self._span.is_recording():
            self._span.set_attribute(ATTR + "cache.predicted_tokens", predicted)
            self._span.set_attribute(ATTR + "cache.cached_tokens", cached)

    def cut(self, why: str) -> None:
        """The answer began and could not be finished: the client got an error event."""
        self.error = why

    def end(self) -> None:
        span = self._span
        if not span.is_recording():
            return
        if self.status is not None:
            span.set_attribute("http.response.status_code", self.status)
        if self.error is not None or (self.status or 0) >= 500:
            span.set_status(Status(StatusCode.ERROR, self.error))
            span.set_attribute("error.type", str(self.status) if (self.status or 0) >= 500 else "stream_cut")
        if self.rank is not None:
            span.set_attribute(ATTR + "rank", self.rank)
        span.set_attribute(ATTR + "retries", self.retries)
        span.set_attribute(ATTR + "resumes", self.resumes)
        span.set_attribute(ATTR + "queue_time_s", round(self.queued_s, 6))
        span.end()
