"""The router's own /metrics (router/pod_metrics.py): which requests it answers, and how it reads
the control port, against a real local server."""

from __future__ import annotations

import asyncio
import socket

import pytest

from vllm_dp_supervisor.router import pod_metrics


@pytest.mark.parametrize(("method", "path", "answered"), [
    (b"GET", b"/metrics", True), (b"HEAD", b"/metrics", True), (b"GET", b"/metrics/", True),
    (b"GET", b"/metrics?name[]=vllm:x", True), (b"POST", b"/metrics", False), (b"GET", b"/metricsx", False),
    (b"GET", b"/v1/metrics", False),
])
def test_only_a_get_or_head_of_metrics_is_answered_by_the_router(method, path, answered):
    assert pod_metrics.asks_for_metrics(method, path) is answered


def serve_once(answer: bytes):
    """A control port that answers every connection with `answer` and closes."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()
    return asyncio.start_server(handle, "127.0.0.1", 0)


async def fetch_from(answer: bytes) -> tuple[bytes, bytes]:
    server = await serve_once(answer)
    async with server:
        port = server.sockets[0].getsockname()[1]
        return await pod_metrics.fetch("127.0.0.1", port, timeout=5)


def test_the_control_ports_body_and_content_type_are_relayed():
    body = b"# TYPE supervisor_ready gauge\nsupervisor_ready 1.0\n" * 2000
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\n\r\n" + body
    assert asyncio.run(fetch_from(answer)) == (b"text/plain; version=0.0.4", body)


@pytest.mark.parametrize("answer", [b"HTTP/1.1 500 Internal Server Error\r\n\r\noops", b"garbage", b""])
def test_a_control_port_that_answers_badly_is_an_error(answer):
    with pytest.raises(ValueError, match="control port"):
        asyncio.run(fetch_from(answer))


def test_a_control_port_that_is_not_there_is_an_oserror():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(OSError):
        asyncio.run(pod_metrics.fetch("127.0.0.1", port, timeout=5))


def test_the_response_is_whole_and_a_head_has_no_body():
    full = pod_metrics.response(b"text/plain", b"x 1\n", head_only=False, close=False)
    assert full.endswith(b"\r\n\r\nx 1\n") and b"content-length: 4" in full and b"connection: close" not in full
    head = pod_metrics.response(b"text/plain", b"x 1\n", head_only=True, close=True)
    assert head.endswith(b"\r\n\r\n") and b"content-length: 4" in head and b"connection: close" in head
