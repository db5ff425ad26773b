"""router/proxy.py's pure part: the request as a rank gets it."""

from __future__ import annotations

from vllm_dp_supervisor.router.client import Request
from vllm_dp_supervisor.router.proxy import upstream_request


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
