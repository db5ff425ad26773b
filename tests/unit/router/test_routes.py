"""router/routes.py: endpoint families, what may be sent twice, OpenAI-shaped errors. Pure."""

from __future__ import annotations

import json

from vllm_dp_supervisor.router.client import Request
from vllm_dp_supervisor.router.routes import error_response, family, resendable, sse_error_event, upstream_request


def test_only_stateless_endpoints_may_be_sent_twice():
    for path in (b"/v1/completions", b"/v1/chat/completions", b"/v1/embeddings", b"/v1/rerank",
                 b"/score", b"/tokenize", b"/v1/chat/completions/"):
        assert resendable(path), path
    for path in (b"/v1/responses", b"/v1/load_lora_adapter", b"/v1/models", b"/reset_prefix_cache",
                 b"/v1/audio/transcriptions", b"/", b""):
        assert not resendable(path), path
    assert family(b"/v1/chat/completions") == "chat" and family(b"/nope") == "other"


def test_errors_look_like_openais():
    head, _, body = error_response(503, "Service Unavailable", "no rank", "service_unavailable",
                                   retry_after=1).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in head
    assert json.loads(body) == {"error": {"message": "no rank", "type": "service_unavailable", "param": None,
                                          "code": 503}}
    first, second = sse_error_event("cut").split(b"\n\n")[:2]
    assert json.loads(first.removeprefix(b"data: "))["error"]["message"] == "cut"
    assert second == b"data: [DONE]"


def test_the_rank_gets_the_request_unchanged_but_for_hop_by_hop_headers():
    request = Request(b"POST", b"/v1/completions?x=1", b"/v1/completions", True, [
        (b"Host", b"pod:8080"), (b"Authorization", b"Bearer k"), (b"Connection", b"keep-alive, X-Hop"),
        (b"X-Hop", b"1"), (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers"), (b"Transfer-Encoding", b"chunked"),
        (b"X-Forwarded-For", b"10.0.0.1"), (b"Expect", b"100-continue"), (b"Content-Length", b"999"),
        (b"X-Custom", b"kept")], b'{"prompt": "hi"}', True, 0.0)
    head, _, body = upstream_request(request, b"10.0.0.9").partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/completions?x=1 HTTP/1.1"
    names = [line.split(b":")[0].lower() for line in lines[1:]]
    assert names == [b"host", b"authorization", b"x-custom", b"x-forwarded-for", b"content-length"]
    assert b"x-forwarded-for: 10.0.0.1, 10.0.0.9" in lines
    assert b"content-length: 16" in lines and body == b'{"prompt": "hi"}'
