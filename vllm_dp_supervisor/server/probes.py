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
    def unauthorized(self) -> bool:
        """The rank refused our credentials: a configuration problem, not a sick rank."""
        return self.status in (401, 403)


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
