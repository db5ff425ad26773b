"""A fast stand-in rank for the router benchmark: uvloop + httptools, so the routers, not the rank,
are what the figures measure (tests/standin.py, a threaded stdlib server, tops out far lower).

Speaks GET /health, GET /v1/models, POST /v1/completions and /v1/chat/completions (a small JSON
answer, or with "stream": true ten SSE chunks); every answer carries `x-rank-pid`. Accepts and
ignores vLLM's flags; listens on --host/--port. With --ready-stamp DIR it writes DIR/<pid>
holding time.time() the moment it listens (for re-admission timing).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import httptools
import uvloop

ANSWER = (b'{"object":"text_completion","model":"bench-model","choices":[{"index":0,"text":" Paris",'
          b'"finish_reason":"length"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}')
CHUNK = b'data: {"object":"text_completion","choices":[{"index":0,"text":" t"}]}\n\n'
PID = str(os.getpid()).encode()


class Rank(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body = b""
        self.streaming: asyncio.Future | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.body = b"", b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        if self.url.startswith(b"/v1/completions") or self.url.startswith(b"/v1/chat/completions"):
            if b'"stream": true' in self.body or b'"stream":true' in self.body:
                self.streaming = asyncio.ensure_future(self.stream())  # kept: a task nobody holds may vanish
                return
            self.reply(ANSWER)
        elif self.url.startswith(b"/v1/models"):
            self.reply(b'{"object":"list","data":[{"id":"bench-model","object":"model"}]}')
        else:
            self.reply(b"")

    def reply(self, body: bytes) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-rank-pid: " + PID +
                             b"\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))

    async def stream(self) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-rank-pid: " + PID +
                             b"\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(10):
            self.transport.write(b"%x\r\n%b\r\n" % (len(CHUNK), CHUNK))
            await asyncio.sleep(0.001)
        done = b"data: [DONE]\n\n"
        self.transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(done), done))


async def main(argv: list[str]) -> None:
    host = argv[argv.index("--host") + 1] if "--host" in argv else "127.0.0.1"
    port = int(argv[argv.index("--port") + 1])
    server = await asyncio.get_running_loop().create_server(Rank, host, port, backlog=1024)
    if "--ready-stamp" in argv:
        stamp = os.path.join(argv[argv.index("--ready-stamp") + 1], str(os.getpid()))
        with open(stamp + ".tmp", "w") as f:
            f.write(repr(time.time()))
        os.replace(stamp + ".tmp", stamp)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1:]))
