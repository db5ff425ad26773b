"""OpenTelemetry traces end to end: the real CLI with --otlp-traces-endpoint, a local OTLP/HTTP
receiver as the collector (tests/otlp_receiver.py), stand-in ranks that show what they were sent."""

from __future__ import annotations

import json
import signal

import psutil
from harness import FAST, request, wait_for
from otlp_receiver import CLIENT, ERROR, EXPORT_HERE, SERVER, OtlpReceiver

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


def test_a_request_is_a_span_in_the_clients_trace_and_its_rank_is_sent_the_context_of_its_exchange(start):
    with OtlpReceiver() as receiver:
        run = start(2, options=["--otlp-traces-endpoint", receiver.endpoint], env=EXPORT_HERE)
        run.wait_ready()
        # Each rank is given the same endpoint, for vLLM's own spans.
        for rank in run.status()["ranks"]:
            argv = psutil.Process(rank["pid"]).cmdline()
            assert argv[argv.index("--otlp-traces-endpoint") + 1] == receiver.endpoint
        status, _, body = request(run, "POST", "/echo", b"{}", {
            "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "Authorization": "Bearer sk-never-on-a-span"})
        assert status == 200
        sent = {k.lower(): v for k, v in json.loads(body)["headers"]}
        spans = wait_for(lambda: receiver.where("trace_id", CLIENT_TRACE, 2), 20,
                         "the request's two spans at the collector")
        server = next(s for s in spans if s["kind"] == SERVER)
        exchange = next(s for s in spans if s["kind"] == CLIENT)
        # /echo is no route vLLM serves: the span is named by its method alone (OpenTelemetry's rule
        # for a path without a low-cardinality route), the path in url.path
        assert server["name"] == "POST" and server["parent_span_id"] == CLIENT_SPAN
        assert server["attributes"]["url.path"] == "/echo" and "http.route" not in server["attributes"]
        assert server["attributes"]["http.response.status_code"] == 200
        assert server["attributes"]["vllm_dp_supervisor.rank"] == int(json.loads(body)["rank"])
        assert server["resource"]["service.name"] == "vllm-dp-supervisor"
        assert exchange["parent_span_id"] == server["span_id"]
        # The rank got the exchange's context, not the client's: its spans go under the router's.
        assert sent["traceparent"] == f"00-{CLIENT_TRACE}-{exchange['span_id']}-01"
        assert "sk-never-on-a-span" not in json.dumps(receiver.received())
        run.send(signal.SIGTERM)
        assert run.wait_exit() == 0, run.output()[-3000:]


def test_a_stream_continued_on_another_rank_is_one_span_with_a_continuation_under_it(start):
    with OtlpReceiver() as receiver:
        run = start(2, "--standin-stream-chunks", "30", "--standin-stream-delay", "0.01", "--standin-ranks", "0",
                    "--standin-die-mid-stream", "6",
                    options=[*FAST, "--router-policy", "round-robin", "--otlp-traces-endpoint", receiver.endpoint],
                    env=EXPORT_HERE)
        run.wait_ready()
        body = json.dumps({"model": "standin-model", "prompt": "Once upon a time", "stream": True,
                           "max_tokens": 40}).encode()
        for _ in range(2):  # round-robin from rank 1: the second lands on rank 0, which dies after 6 tokens
            wait_for(lambda: run.all_ready(), 20, "both ranks ready")
            assert request(run, "POST", "/v1/completions", body, {"Content-Type": "application/json"})[0] == 200

        def resumed() -> dict | None:
            return next((s for s in receiver.received() if s["kind"] == SERVER
                         and s["attributes"].get("vllm_dp_supervisor.resumes") == 1), None)
        server = wait_for(resumed, 20, "the resumed stream's span")
        under = wait_for(lambda: receiver.where("parent_span_id", server["span_id"], 2), 20,
                         "its two exchanges")
        first, then = sorted(under, key=lambda s: s["attributes"]["vllm_dp_supervisor.continuation"])
        assert first["attributes"]["vllm_dp_supervisor.rank"] == 0 and first["status"] == ERROR
        assert then["attributes"]["vllm_dp_supervisor.continuation"] is True
        assert then["attributes"]["vllm_dp_supervisor.tokens_before"] == 6
        assert server["attributes"]["vllm_dp_supervisor.rank"] == 1 and server["status"] != ERROR
        assert server["attributes"]["vllm_dp_supervisor.retries"] == 0


def test_tracing_asked_for_with_an_unknown_protocol_fails_before_anything_starts(start):
    run = start(1, options=["--otlp-traces-endpoint", "localhost:4317"],
                env={"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"})
    assert run.wait_exit() == 2
    assert "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL='http/json': must be grpc or http/protobuf" in run.output()
