"""What a rank says its prefix cache held of one request's prompt: vLLM's
`usage.prompt_tokens_details.cached_tokens` (sent under its --enable-prompt-tokens-details), read
from the answer's bytes as they pass, whatever frames them (a JSON body, an SSE stream's usage
chunk, reads split anywhere). Pure; it never changes a byte, and never parses the answer.

Why a search and not a parse: in vLLM's JSON a key is written between bare quotes, and the same
characters inside a string (the generated text, a logprob's token, a tool call's arguments) are
escaped (`\\"`), so `"cached_tokens"` followed by a colon is the key and nothing else. Its first
occurrence is the request's: vLLM writes one usage block with details per answer (its final one;
`continuous_usage_stats` chunks carry no details), and a batch of prompts is not checked.
"""

from __future__ import annotations

import re

KEY = b'"cached_tokens"'
_VALUE = re.compile(rb"\s*:\s*(?:(\d+)|null)(?=[\s,}])")  # a value followed by what ends it
_UNFINISHED = re.compile(rb"\s*(?::\s*(?:\d*|n|nu|nul|null)?)?\Z")  # the bytes may continue the value
_KEEP = 64  # bytes carried to the next read: a key and its value split between reads


class CachedTokens:
    """Fed every byte of one answer; `value` once the answer said it (None until then, and for
    good when it said null)."""

    def __init__(self) -> None:
        self.value: int | None = None
        self.done = False  # found (a number or null): the rest is not read
        self._tail = b""

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        buffer = self._tail + data if self._tail else data
        at = buffer.find(KEY)
        while at >= 0:
            after = at + len(KEY)
            found = _VALUE.match(buffer, after)
            if found is not None:
                self.done = True
                self.value = int(found[1]) if found[1] is not None else None
                self._tail = b""
                return
            if _UNFINISHED.match(buffer, after) is not None and len(buffer) - at <= _KEEP:
                self._tail = buffer[at:]  # the value is still coming
                return
            at = buffer.find(KEY, at + 1)
        self._tail = buffer[-(len(KEY) - 1):]  # a key split between this read and the next
