"""A fast stand-in rank for the router benchmark: uvloop + httptools, so the routers, not the rank,
are what the figures measure (tests/standin.py, a threaded stdlib server, tops out far lower).

Speaks GET /health, GET /v1/models, POST /v1/completions and /v1/chat/completions (a small JSON
answer, or with "stream": true ten SSE chunks; a streamed chat is the token path's: vLLM 0.32's
chunks, byte for byte as it writes them, a role chunk then FAST_RANK_TOKENS (200) tokens, token
ids only under "return_token_ids": true); every answer carries `x-rank-pid`. Accepts and
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
TOKENS = int(os.environ.get("FAST_RANK_TOKENS", "200"))
_HEAD = (b'{"id":"chatcmpl-b3f1c2d4e5f6a7b8","object":"chat.completion.chunk","created":1765000000,'
         b'"model":"bench-model",')


def chat_chunks(ids: bool) -> list[bytes]:
    """A chat's stream as vLLM 0.32 writes it (model_dump_json(exclude_unset=True) of its classes)."""
    prompt = b"[151644,872,198,6023,151645,198,151644,77091,198]" if ids else b"null"
    out = [b"data: " + _HEAD + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
           b'"finish_reason":null}],"prompt_token_ids":' + prompt + b',"prompt_text":null}\n\n']
    for i in range(TOKENS):
        last = i == TOKENS - 1
        finish = b'"length","stop_reason":null' if last else b"null"
        out.append(b"data: " + _HEAD + b'"choices":[{"index":0,"delta":{"content":" word"},"logprobs":null,'
                   b'"finish_reason":' + finish + b',"token_ids":' + (b"[%d]" % (1000 + i) if ids else b"null") +
                   b"}]" + (b',"system_fingerprint":"fp-bench"' if last else b"") + b"}\n\n")
    return [*out, b"data: [DONE]\n\n"]


CHAT_STREAM = {True: chat_chunks(True), False: chat_chunks(False)}


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
                chat = self.url.startswith(b"/v1/chat/completions")
                ids = b'"return_token_ids":true' in self.body or b'"return_token_ids": true' in self.body
                # kept: a task nobody holds may vanish
                self.streaming = asyncio.ensure_future(self.tokens(ids) if chat else self.stream())
                return
            self.reply(ANSWER)
        elif self.url.startswith(b"/v1/models"):
            self.reply(b'{"object":"list","data":[{"id":"bench-model","object":"model"}]}')
        else:
            self.reply(b"")

    def reply(self, body: bytes) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-rank-pid: " + PID +
                             b"\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))

    async def tokens(self, ids: bool) -> None:
        """The token path: a chunk a write, each in a chunk of its own, the loop let run between them."""
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\nx-rank-pid: " +
                             PID + b"\r\ntransfer-encoding: chunked\r\n\r\n")
        for chunk in CHAT_STREAM[ids]:
            self.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            await asyncio.sleep(0)
        self.transport.write(b"0\r\n\r\n")

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
