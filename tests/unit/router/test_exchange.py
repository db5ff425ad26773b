"""router/exchange.py: one answer from a rank on its way to the client, in process (a recording
client instead of a socket)."""

from __future__ import annotations

import asyncio
import json

from vllm_dp_supervisor.router import continuation
from vllm_dp_supervisor.router.activity import Activity
from vllm_dp_supervisor.router.client import Request
from vllm_dp_supervisor.router.exchange import Exchange, Outcome
from vllm_dp_supervisor.router.stream import Stream

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
HEAD = {"id": "chatcmpl-1", "created": 1, "model": "m", "object": "chat.completion.chunk"}


class RecordingClient:
    """What an Exchange uses of a client connection."""

    def __init__(self) -> None:
        self.chunked = False
        self.closing = False
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data


def event(chunk: dict) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def token(text: str, token_id: int, **extra: object) -> bytes:
    return event({**HEAD, "choices": [{"index": 0, "delta": {"content": text}, "token_ids": [token_id],
                                       "finish_reason": None}], **extra})


def test_what_a_rank_sends_after_its_error_event_never_reaches_the_client():
    """Seen with real vLLM (an EngineCore SIGKILLed mid-stream): the error event and [DONE] came
    in two reads; the [DONE], passed on, ended the client's stream as if whole."""
    async def run() -> tuple[Outcome, bytes, Stream]:
        request = Request(b"POST", b"/v1/chat/completions", b"/v1/chat/completions", True, [], BODY, True, 0.0)
        plan = continuation.plan(request, True)
        assert plan is not None
        stream, client = Stream(plan), RecordingClient()
        exchange = Exchange(client, request, 0, 1, Activity(), stream)  # type: ignore[arg-type]
        exchange.head(200, [(b"content-type", b"text/event-stream")])
        exchange.body(event({**HEAD, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                  "finish_reason": None}], "prompt_token_ids": [1, 2, 3]}))
        exchange.body(token("Hello", 7))
        exchange.body(event({"error": {"message": "EngineCore encountered an issue.", "code": 500}}))
        exchange.body(b"data: [DONE]\n\n")
        exchange.complete()
        return await exchange.done, bytes(client.written), stream
    outcome, written, stream = asyncio.run(run())
    assert outcome is Outcome.LOST
    assert b"[DONE]" not in written and b"error" not in written and b"Hello" in written
    assert stream.resumable and not stream.done and stream.generated == [7]  # for the continuation
