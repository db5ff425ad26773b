"""router/tracing.py: the spans of a request, in process (the SDK's in-memory exporter); the
router's routes.with_trace; and that a router without tracing loads no OpenTelemetry."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from vllm_dp_supervisor.router.routes import with_trace
from vllm_dp_supervisor.router.tracing import Tracing, exporter

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01".encode()


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


def tracing(spans: InMemorySpanExporter, environ: dict[str, str] | None = None) -> Tracing:
    return Tracing(SimpleSpanProcessor(spans), environ or {})


def test_a_request_is_a_server_span_under_the_clients_and_each_exchange_a_client_span_under_it(spans):
    trace = tracing(spans).request(b"POST", b"/v1/completions?x=1", [(b"TraceParent", TRACEPARENT)],
                                   time.monotonic() - 0.25, route="/v1/completions")
    span, lines = trace.attempt(1, 3, 8001, None, method=b"POST", path=b"/v1/completions?x=1")
    trace.attempt_ended(span, 200, None)
    trace.answered(200)
    trace.end()
    client, server = spans.get_finished_spans()
    assert server.kind is SpanKind.SERVER and server.name == "POST /v1/completions"
    assert f"{server.context.trace_id:032x}" == CLIENT_TRACE and f"{server.parent.span_id:016x}" == CLIENT_SPAN
    assert server.end_time - server.start_time >= 0.25e9  # from the request's last byte, not from now
    assert server.attributes["http.response.status_code"] == 200 and server.attributes["url.path"] == "/v1/completions"
    assert server.attributes["vllm_dp_supervisor.rank"] == 1
    assert server.attributes["vllm_dp_supervisor.retries"] == 0 and server.attributes["vllm_dp_supervisor.resumes"] == 0
    assert client.kind is SpanKind.CLIENT and client.name == "POST /v1/completions"
    assert client.parent.span_id == server.context.span_id
    assert client.attributes["vllm_dp_supervisor.rank_attempt"] == 3 and client.attributes["server.port"] == 8001
    # The rank is sent the client span's context: vLLM's spans go under it, in the client's trace.
    assert lines == f"traceparent: 00-{CLIENT_TRACE}-{client.context.span_id:016x}-01\r\n".encode()
    assert server.resource.attributes["service.name"] == "vllm-dp-supervisor"


def test_without_a_traceparent_the_request_starts_a_trace_and_otel_service_name_names_it(spans):
    trace = tracing(spans, {"OTEL_SERVICE_NAME": "pod-a"}).request(b"GET", b"/v1/models", [], time.monotonic())
    trace.end()
    (server,) = spans.get_finished_spans()
    assert server.parent is None and server.resource.attributes["service.name"] != "vllm-dp-supervisor"


def test_retries_resumes_queue_time_and_failures_are_on_the_spans(spans):
    trace = tracing(spans).request(b"POST", b"/v1/chat/completions", [], time.monotonic())
    trace.queued_s += 0.5
    first, _ = trace.attempt(0, 1, 8000, None)
    trace.attempt_ended(first, None, "cannot connect: Connection refused")
    trace.answered(502)
    second, _ = trace.attempt(1, 1, 8001, None)  # sent again: a retry
    trace.attempt_ended(second, 200, "the model server died")
    trace.resumes += 1
    third, _ = trace.attempt(0, 2, 8000, 12)  # a continuation of 12 tokens: not a retry
    trace.attempt_ended(third, 200, None)
    trace.answered(200)
    trace.end()
    *exchanges, server = spans.get_finished_spans()
    assert [s.attributes.get("vllm_dp_supervisor.continuation") for s in exchanges] == [False, False, True]
    assert exchanges[2].attributes["vllm_dp_supervisor.tokens_before"] == 12
    assert exchanges[0].status.status_code is StatusCode.ERROR and "refused" in exchanges[0].status.description
    assert "http.response.status_code" not in exchanges[0].attributes
    assert server.attributes["vllm_dp_supervisor.retries"] == 1 and server.attributes["vllm_dp_supervisor.resumes"] == 1
    assert server.attributes["vllm_dp_supervisor.queue_time_s"] == 0.5
    assert server.attributes["vllm_dp_supervisor.rank"] == 0
    assert server.status.status_code is not StatusCode.ERROR  # the 502 was not what the client got


def test_a_cut_stream_and_a_503_are_errors_and_a_client_gone_is_said(spans):
    t = tracing(spans)
    cut = t.request(b"POST", b"/v1/completions", [], time.monotonic())
    cut.answered(200)
    cut.cut("rank 0 failed mid-answer: connection lost")
    cut.end()
    none = t.request(b"POST", b"/v1/completions", [], time.monotonic())
    none.answered(503)
    none.end()
    gone = t.request(b"POST", b"/v1/completions", [], time.monotonic())
    gone.answered(0, client_gone=True)
    gone.end()
    cut_span, none_span, gone_span = spans.get_finished_spans()
    assert cut_span.status.status_code is StatusCode.ERROR and "mid-answer" in cut_span.status.description
    assert none_span.status.status_code is StatusCode.ERROR
    assert none_span.attributes["http.response.status_code"] == 503
    assert gone_span.attributes["vllm_dp_supervisor.client_gone"] is True


def test_no_header_or_body_content_goes_on_a_span(spans):
    trace = tracing(spans).request(b"POST", b"/v1/completions?api_key=k", [(b"Authorization", b"Bearer sk-secret")],
                                   time.monotonic())
    trace.end()
    (server,) = spans.get_finished_spans()
    assert "sk-secret" not in repr(dict(server.attributes)) and "api_key" not in repr(dict(server.attributes))


def test_with_trace_replaces_the_clients_trace_headers():
    data = (b"POST /v1/completions HTTP/1.1\r\nhost: pod\r\nTraceparent: 00-aa-bb-01\r\ntracestate: x=1\r\n"
            b"content-length: 2\r\n\r\n{}")
    out = with_trace(data, b"traceparent: 00-cc-dd-01\r\n")
    assert out == (b"POST /v1/completions HTTP/1.1\r\nhost: pod\r\ncontent-length: 2\r\n"
                   b"traceparent: 00-cc-dd-01\r\n\r\n{}")
    assert with_trace(b"GET / HTTP/1.1\r\n\r\n", b"") == b"GET / HTTP/1.1\r\n\r\n"


def test_the_exporter_is_the_one_vllm_would_make():
    grpc = exporter("localhost:4317", {})
    assert type(grpc).__module__.endswith("proto.grpc.trace_exporter")
    http = exporter("http://localhost:4318/v1/traces", {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"})
    assert type(http).__module__.endswith("proto.http.trace_exporter")
    with pytest.raises(ValueError, match="must be one of grpc, http/protobuf"):
        exporter("localhost:4317", {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"})


def test_a_router_worker_without_tracing_loads_no_opentelemetry():
    code = ("import sys, vllm_dp_supervisor.router.worker, vllm_dp_supervisor.router.proxy; "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_request_the_client_did_not_sample_makes_no_span_and_tells_the_rank_so(spans):
    unsampled = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00".encode()
    trace = tracing(spans).request(b"POST", b"/v1/completions", [(b"traceparent", unsampled)], time.monotonic())
    first, lines = trace.attempt(0, 1, 8000, None)
    trace.attempt_ended(first, None, "cannot connect")
    _, again = trace.attempt(1, 1, 8001, None)
    trace.answered(200)
    trace.end()
    assert spans.get_finished_spans() == ()
    assert lines == again and lines.startswith(f"traceparent: 00-{CLIENT_TRACE}-".encode())
    assert lines.endswith(b"-00\r\n")  # not sampled: vLLM records nothing of it either


def test_the_cache_prediction_and_what_the_rank_hit_are_on_the_request_span(spans):
    trace = tracing(spans).request(b"POST", b"/v1/chat/completions", [], time.monotonic())
    trace.cache_checked(256, 128)
    trace.end()
    (server,) = spans.get_finished_spans()
    assert server.attributes["vllm_dp_supervisor.cache.predicted_tokens"] == 256
    assert server.attributes["vllm_dp_supervisor.cache.cached_tokens"] == 128



def test_spans_follow_opentelemetry_s_http_and_gen_ai_conventions(spans):
    """Attribute names checked against the spec's own (opentelemetry-semantic-conventions)."""
    from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
    from opentelemetry.semconv.attributes import (
        error_attributes,
        http_attributes,
        network_attributes,
        server_attributes,
        url_attributes,
    )

    from vllm_dp_supervisor.router.routes import route
    trace = tracing(spans).request(b"POST", b"/v1/chat/completions", [], time.monotonic(),
                                   route=route(b"/v1/chat/completions"), http11=True, operation="chat", model="qwen")
    span, _ = trace.attempt(0, 1, 8000, None, method=b"POST", path=b"/v1/chat/completions", host="127.0.0.1")
    trace.attempt_ended(span, 500, "the rank answered 500")
    trace.usage(120, 7, 64)
    trace.answered(500)
    trace.end()
    client, server = spans.get_finished_spans()
    assert server.name == "POST /v1/chat/completions"
    assert server.attributes[http_attributes.HTTP_REQUEST_METHOD] == "POST"
    assert server.attributes[http_attributes.HTTP_ROUTE] == "/v1/chat/completions"
    assert server.attributes[url_attributes.URL_PATH] == "/v1/chat/completions"
    assert server.attributes[url_attributes.URL_SCHEME] == "http"
    assert server.attributes[network_attributes.NETWORK_PROTOCOL_VERSION] == "1.1"
    assert server.attributes[http_attributes.HTTP_RESPONSE_STATUS_CODE] == 500
    assert server.attributes[error_attributes.ERROR_TYPE] == "500"
    assert server.attributes[gen_ai.GEN_AI_OPERATION_NAME] == "chat"
    assert server.attributes[gen_ai.GEN_AI_REQUEST_MODEL] == "qwen"
    assert server.attributes[gen_ai.GEN_AI_PROVIDER_NAME] == "vllm"
    assert server.attributes[gen_ai.GEN_AI_USAGE_INPUT_TOKENS] == 120
    assert server.attributes[gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS] == 7
    assert server.attributes[gen_ai.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] == 64
    assert client.name == "POST /v1/chat/completions"
    assert client.attributes[server_attributes.SERVER_ADDRESS] == "127.0.0.1"
    assert client.attributes[server_attributes.SERVER_PORT] == 8000
    assert client.attributes[url_attributes.URL_FULL] == "http://127.0.0.1:8000/v1/chat/completions"
    assert client.attributes[error_attributes.ERROR_TYPE] == "500"
    assert client.status.status_code is StatusCode.ERROR


def test_a_path_without_a_route_names_its_span_by_its_method_alone(spans):
    from vllm_dp_supervisor.router.routes import route
    assert route(b"/v1/responses/resp_abc/cancel") == "/v1/responses/{response_id}/cancel"
    assert route(b"/whatever/user-42") is None
    trace = tracing(spans).request(b"BREW", b"/whatever/user-42", [], time.monotonic(), route=None)
    trace.end()
    (server,) = spans.get_finished_spans()
    assert server.name == "_OTHER" and server.attributes["http.request.method_original"] == "BREW"
