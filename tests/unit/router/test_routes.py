"""router/routes.py: endpoint families, what may be sent twice, OpenAI-shaped errors. Pure."""

from __future__ import annotations

import json

from vllm_dp_supervisor.router.routes import error_response, family, resendable, sse_error_event


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
