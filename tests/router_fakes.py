"""A router worker's surroundings in process: a client connection that records what it is sent,
and connections to ranks that play a script (uvicorn's MockTransport style), behind the
protocols the router uses (router/upstream.Connections). With them a `Passage` runs its whole
life, retries, continuations and cuts included, without a socket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from typing import Any

from vllm_dp_supervisor.router import policies
from vllm_dp_supervisor.router.proxy import Router
from vllm_dp_supervisor.router.stats import WorkerStats
from vllm_dp_supervisor.router.upstream import Sink
from vllm_dp_supervisor.settings.options import parse_config

SSE = [(b"content-type", b"text/event-stream")]
JSON = [(b"content-type", b"application/json")]
# A step of a rank's answer: ("head", status, headers), ("body", bytes), ("complete",), ("lost", why),
# ("wait",): nothing more until the connection is closed (a rank generating, or hung).
Step = tuple[Any, ...]


class RecordingClient:
    """What the router uses of a client's connection (router/client.ClientConnection)."""

    def __init__(self) -> None:
        self.peer = b"10.0.0.9"
        self.chunked = False
        self.closing = False
        self.exchange: Any = None
        self.writable = asyncio.Event()
        self.writable.set()
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data

    def body(self) -> bytes:
        """What the client read of the answer's body, chunks joined."""
        head, _, rest = bytes(self.written).partition(b"\r\n\r\n")
        if b"transfer-encoding: chunked" not in head:
            return rest
        out = bytearray()
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            out += rest[:n]
            rest = rest[n + 2:]
        return bytes(out)


class ScriptedConnection:
    """A connection to a rank: what it is sent picks its script (a side request's answer, else
    the rank's next script)."""

    def __init__(self, rank: int, steps: Sequence[Step], pool: ScriptedPool) -> None:
        self.rank, self.steps, self.pool = rank, list(steps), pool
        self.closed = False
        self.sent = b""

    def send(self, data: bytes, sink: Sink, *, head_only: bool) -> bool:
        self.sent = data
        steps = self.pool.side(self.rank, data)
        if steps is None:
            steps = list(self.pool.script(self.rank) or ())
        self.steps = steps
        asyncio.get_running_loop().call_soon(self._play, sink)
        return True

    def _play(self, sink: Sink) -> None:
        for step in self.steps:
            if self.closed or step[0] == "wait":
                return
            if step[0] == "head":
                sink.head(step[1], step[2])
            elif step[0] == "body":
                sink.body(step[1])
                sink.flush()  # one read from the rank, as upstream.Upstream's data_received ends
            elif step[0] == "complete":
                self.closed = step[-1] == "close"
                sink.complete()
            elif step[0] == "lost":
                self.closed = True
                sink.lost(step[1])

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


# The scripts' word tokens; any other id under 256 is that byte (a byte-level tokenizer's).
WORDS = {7: "Hel", 8: "lo", 9: " world", 10: "!"}


def decode(ids: list[int]) -> str:
    """What a rank's /detokenize answers for the scripts' tokens (bytes decoded as UTF-8)."""
    return b"".join(WORDS[i].encode() if i in WORDS else bytes([i]) if i < 256 else b"" for i in ids).decode(
        "utf-8", errors="replace")


class ScriptedPool:
    """Each rank answers its next script; a script of None: the connection is refused. A side
    request (a continuation's /detokenize, /v1/models) is answered as vLLM would, by `decode` and
    `max_model_len`, without taking a script; `asked` keeps them."""

    def __init__(self, scripts: dict[int, list[Sequence[Step] | None]],
                 decode: Callable[[list[int]], str] = decode, max_model_len: int = 4096) -> None:
        self.scripts = scripts
        self.connections: list[ScriptedConnection] = []
        self.asked: list[tuple[int, bytes]] = []
        self._decode, self._max_model_len = decode, max_model_len

    def side(self, rank: int, data: bytes) -> list[Step] | None:
        line = data.split(b"\r\n", 1)[0]
        if line.startswith(b"POST /detokenize "):
            self.asked.append((rank, line))
            text = self._decode(json.loads(data.partition(b"\r\n\r\n")[2])["tokens"])
            body = json.dumps({"prompt": text}).encode()
        elif line.startswith(b"GET /v1/models "):
            self.asked.append((rank, line))
            body = json.dumps({"data": [{"id": "m", "max_model_len": self._max_model_len}]}).encode()
        else:
            return None
        return [("head", 200, [*JSON, (b"content-length", b"%d" % len(body))]), ("body", body), ("complete",)]

    async def acquire(self, rank: int, port: int, attempt: int) -> ScriptedConnection:
        if self.scripts.get(rank) and self.scripts[rank][0] is None:
            self.scripts[rank].pop(0)
            raise ConnectionRefusedError(111, "Connection refused")
        conn = ScriptedConnection(rank, [], self)
        self.connections.append(conn)
        return conn

    def script(self, rank: int) -> Sequence[Step] | None:
        script = self.scripts[rank].pop(0)
        return script

    def release(self, conn: Any) -> None:
        pass

    def retain(self, live: frozenset[tuple[int, int]]) -> None:
        pass

    def close(self) -> None:
        pass


class Reports:
    def __init__(self) -> None:
        self.unreachable: list[tuple[int, int, str]] = []
        self.resumed: list[tuple[int, int, int]] = []


def router(pool: ScriptedPool, ranks: Sequence[int] = (0, 1), options: Sequence[str] = (),
           policy: str = "round-robin") -> tuple[Router, Reports]:
    """A router over `pool` with `ranks` ready (attempt 1), round-robin by default: rank 0 first."""
    # vLLM's neutral generation defaults (--generation-config vllm): no model files to read
    model = [] if "--" in options else ["--", "standin-model", "--generation-config", "vllm"]
    settings = parse_config(["--dp-size-local", str(max(2, len(ranks))), "--router-policy", policy,
                             "--router-queue-timeout", "0.2", *options, *model], {}).router_settings
    reports = Reports()
    made = Router(settings, WorkerStats(), policies.build(settings, rand=lambda: 0.0),
                  lambda rank, attempt, why: reports.unreachable.append((rank, attempt, why)), lambda: None,
                  lambda a, b, tokens, gap: reports.resumed.append((a, b, tokens)), pool=pool)
    made.update({rank: (8000 + rank, 1) for rank in ranks})
    if policy == "round-robin":
        made.policy._turn = -1  # type: ignore[attr-defined]  # the first pick is the first candidate
    return made, reports


def event(chunk: dict[str, Any] | str) -> bytes:
    return b"data: " + (chunk.encode() if isinstance(chunk, str) else json.dumps(chunk).encode()) + b"\n\n"


def chat_chunk(text: str | None, ids: list[int], finish: str | None = None, **extra: Any) -> bytes:
    delta = {"content": text} if text is not None else {"role": "assistant", "content": ""}
    return event({"id": "chatcmpl-1", "created": 1, "model": "m", "object": "chat.completion.chunk",
                  "choices": [{"index": 0, "delta": delta, "token_ids": ids, "finish_reason": finish}], **extra})


def completion_chunk(text: str, ids: list[int], finish: str | None = None) -> bytes:
    return event({"id": "cmpl-9", "created": 2, "model": "m", "object": "text_completion",
                  "choices": [{"index": 0, "text": text, "token_ids": ids, "finish_reason": finish}]})


def run(coroutine_factory: Callable[[], Any]) -> Any:
    return asyncio.run(coroutine_factory())
