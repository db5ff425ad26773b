"""server/client.py: the probes' HTTP client, against a real aiohttp server on loopback."""

from __future__ import annotations


def test_a_metrics_body_in_many_chunks_is_read_whole_and_a_huge_one_refused():
    """aiohttp's content.read(n) returns the next chunk only: the body must be read to its end."""
    import asyncio

    from aiohttp import web

    from vllm_dp_supervisor.server.client import Prober

    body = b"".join(f"vllm:x{{i=\"{i}\"}} {i}\n".encode() for i in range(20000))  # ~400 KiB

    async def metrics_handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for start in range(0, len(body), 4096):
            await response.write(body[start:start + 4096])
            await asyncio.sleep(0)
        await response.write_eof()
        return response

    async def scenario() -> tuple:
        app = web.Application()
        app.router.add_get("/metrics", metrics_handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with Prober() as prober:
                whole = await prober.get_text(f"http://127.0.0.1:{port}/metrics", 10, 8 << 20)
                cut = await prober.get_text(f"http://127.0.0.1:{port}/metrics", 10, len(body) - 1)
        finally:
            await runner.cleanup()
        return whole, cut
    (result, text), (_, too_large) = asyncio.run(scenario())
    assert result.ok and text == body.decode()
    assert too_large is None
