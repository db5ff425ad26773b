"""The router's own /metrics: the same body as the supervisor's control port, never a rank's.

vLLM users scrape /metrics on the API port; proxied to a rank, each scrape would read another
rank's counters and `rate()` over them would be noise. So a GET /metrics on the router is
answered here with the supervisor's whole exposition (the pod's series and every rank's `vllm:*`
with a `rank` label), fetched from the control port at scrape time over loopback. Nothing is
cached; a control port that does not answer gives a 503 the scraper counts as a failed scrape.
Never forwards the client's headers (an API key meant for the ranks has nothing to do there).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from vllm_dp_supervisor.router.routes import error_response

if TYPE_CHECKING:
    from vllm_dp_supervisor.router.client import ClientConnection, Request

METRICS_PATH = b"/metrics"
FETCH_TIMEOUT_S = 10.0
MAX_BYTES = 64 << 20  # every rank's vllm:* series; far above what 8 ranks write


def asks_for_metrics(method: bytes, path: bytes) -> bool:
    """Is this request a scrape the router answers itself?"""
    return method in (b"GET", b"HEAD") and path.split(b"?", 1)[0].rstrip(b"/") == METRICS_PATH


async def fetch(host: str, port: int, timeout: float = FETCH_TIMEOUT_S) -> tuple[bytes, bytes]:
    """(content type, body) of the control port's /metrics; OSError or TimeoutError when it
    cannot be read, ValueError when its answer is not a 200 with a body."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(b"GET /metrics HTTP/1.0\r\nHost: " + host.encode() + b"\r\n\r\n")
            answer = await reader.read(MAX_BYTES + 1)
            while chunk := await reader.read(MAX_BYTES + 1 - len(answer)):
                answer += chunk
                if len(answer) > MAX_BYTES:
                    raise ValueError("the control port's /metrics is too large")
        finally:
            writer.close()
    head, sep, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not sep or len(lines[0].split()) < 2 or lines[0].split()[1] != b"200":
        raise ValueError(f"the control port answered {lines[0][:80]!r}")
    content_type = b"text/plain; version=0.0.4; charset=utf-8"
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-type":
            content_type = value.strip()
    return content_type, body


def response(content_type: bytes, body: bytes, *, head_only: bool, close: bool) -> bytes:
    headers = [b"HTTP/1.1 200 OK", b"content-type: " + content_type, b"content-length: %d" % len(body),
               b"cache-control: no-store"]
    if close:
        headers.append(b"connection: close")
    return b"\r\n".join(headers) + b"\r\n\r\n" + (b"" if head_only else body)


async def answer(client: ClientConnection, request: Request, at: tuple[str, int]) -> bool:
    """Answer a scrape with the control port's /metrics at `at` (host, port); False when the
    client's connection must close."""
    try:
        content_type, body = await fetch(*at)
    except (OSError, TimeoutError, ValueError) as exc:
        client.write(error_response(503, "Service Unavailable", f"the pod's metrics could not be read: {exc}",
                                    "service_unavailable", close=client.closing))
    else:
        client.write(response(content_type, body, head_only=request.method == b"HEAD", close=client.closing))
    return request.keep_alive and not client.closing
