"""What a rank's answer says of its usage: the prompt tokens its prefix cache hit (vLLM's
`usage.prompt_tokens_details.cached_tokens`, under its --enable-prompt-tokens-details), and the
prompt and completion tokens (`usage.prompt_tokens`, `usage.completion_tokens`), read from the
answer's bytes as they pass, whatever frames them (a JSON body, an SSE stream's usage chunks,
reads split anywhere). Pure; it never changes a byte, and never parses the answer.

Why a search and not a parse: in vLLM's JSON a key is written between bare quotes, and the same
characters inside a string (the generated text, a logprob's token, a tool call's arguments) are
escaped (`\\"`), so `"cached_tokens"` followed by a colon is the key and nothing else. The last
value of each key wins: a stream with `continuous_usage_stats` counts in every chunk, and its
final usage chunk comes last (vLLM writes the cached tokens there only). A batch of prompts is
not checked (its details are its last prompt's).
"""

from __future__ import annotations

import re

KEYS = {b'"cached_tokens"': "cached", b'"prompt_tokens"': "prompt", b'"completion_tokens"': "completion"}
_VALUE = re.compile(rb"\s*:\s*(?:(\d+)|null)(?=[\s,}])")  # a value followed by what ends it
_UNFINISHED = re.compile(rb"\s*(?::\s*(?:\d*|n|nu|nul|null)?)?\Z")  # the bytes may continue the value
_KEEP = 64  # bytes carried to the next read: a key and its value split between reads
_LONGEST = max(map(len, KEYS))


class CachedTokens:
    """Fed every byte of one answer; `value` (cached tokens), `prompt` and `completion` once the
    answer said them (None until then, and when it said null)."""

    def __init__(self) -> None:
        self.value: int | None = None
        self.prompt: int | None = None
        self.completion: int | None = None
        self._tail = b""

    def feed(self, data: bytes) -> None:
        buffer = self._tail + data if self._tail else data
        keep = max(0, len(buffer) - (_LONGEST - 1))  # where the tail starts: a key split between reads
        for key, field in KEYS.items():
            at = buffer.find(key)
            while at >= 0:
                after = at + len(key)
                found = _VALUE.match(buffer, after)
                if found is not None:
                    setattr(self, "value" if field == "cached" else field,
                            int(found[1]) if found[1] is not None else None)
                elif _UNFINISHED.match(buffer, after) is not None and len(buffer) - at <= _KEEP:
                    keep = min(keep, at)  # the value is still coming
                at = buffer.find(key, after)
        self._tail = buffer[keep:]
