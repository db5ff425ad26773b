"""What a probe of a rank found, and how vLLM's own answers are read: pure, no I/O (the core
reads these; `client.py` asks the ranks).
"""

from __future__ import annotations

import dataclasses
import enum


class ProbeFailure(enum.Enum):
    TIMEOUT = "timeout"    # no answer within --probe-timeout: hung, or overloaded
    REFUSED = "refused"    # nothing listens (yet): loading, or the server is gone
    STATUS = "status"      # answered, but not 200 (vLLM answers 503 when its engine died)
    ERROR = "error"        # connection reset, bad response, ...


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    failure: ProbeFailure | None
    status: int | None
    elapsed_ms: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def engine_dead(self) -> bool:
        """vLLM's /health answers 503 only when its engine died (EngineDeadError, 0.32): final, not
        a blip to count; vLLM's API server shuts itself down after it."""
        return self.status == 503

    @property
    def unauthorized(self) -> bool:
        """The rank refused our credentials: a configuration problem, not a sick rank."""
        return self.status in (401, 403)


# What vLLM 0.32 answers a request with once its engine died (EngineDeadError's message, in an
# OpenAI error JSON with status 500): the rank failed before answering, the request did not.
ENGINE_DEAD_MESSAGE = b"EngineCore encountered an issue"
ENGINE_DEAD_MAX_BODY = 4096  # that answer is a few hundred bytes; a larger one is not it


def one_token(model: str) -> dict[str, object]:
    """The body of a one-token completion: the deep probe's, and the stall judge's evidence that
    an engine runs steps."""
    return {"model": model, "prompt": "ping", "max_tokens": 1}


def engine_died(status: int, body: bytes) -> bool:
    """Whether an answer says the rank's engine is dead, not that the request was bad."""
    return status >= 500 and ENGINE_DEAD_MESSAGE in body


# vLLM's counters of the tokens its engine processed: moving, they mean the engine works.
TOKEN_COUNTERS = ("vllm:generation_tokens_total", "vllm:prompt_tokens_total")
METRICS_MAX_BYTES = 8 << 20  # a rank's /metrics larger than this is not read (vLLM's is ~100 KiB)


def token_total(metrics_text: str) -> float | None:
    """Prompt + generation tokens in a vLLM /metrics exposition, or None if it has no such counter."""
    total, seen = 0.0, False
    for line in metrics_text.splitlines():
        if line.startswith(TOKEN_COUNTERS):
            try:
                total += float(line.rsplit(" ", 1)[1])
                seen = True
            except (IndexError, ValueError):
                continue
    return total if seen else None
