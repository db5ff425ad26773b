"""Which key pins a request to a rank (`prefix` and `session` policies), and which rank a key
goes to under a bound on load. Pure: no I/O, no clock, no state kept between requests.

Placement is rendezvous hashing (highest random weight): each ready rank gets a weight from
(key, rank); the heaviest wins. When a rank leaves rotation only its keys move, and they come
back when it returns; a deterministic mix (not Python's per-process `hash`) makes every worker
agree. Bounded loads: a rank whose in-flight count would go above ceil(bound x mean) is skipped for
the next in weight order, so a hot prefix cannot pull more than that share onto one rank.

The router remembers nothing per key: memory does not grow with the number of prompts (a prefix
trie did, and OOM-killed a router in production: vllm-project/production-stack#687).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

MASK = (1 << 64) - 1


def mix(key: int, rank: int) -> int:
    """splitmix64 of key and rank: a well-spread 64-bit weight, the same in every process."""
    z = (key ^ ((rank + 1) * 0x9E3779B97F4A7C15)) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def key_hash(key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def place(key: int, candidates: Sequence[int], inflight: Mapping[int, int], bound: float) -> tuple[int, bool]:
    """The rank for `key` among `candidates` (not empty), and whether it is the key's first choice.
    A candidate is skipped while taking one more request would put it above ceil(bound x mean),
    the mean counting this request."""
    order = sorted(candidates, key=lambda r: mix(key, r), reverse=True)
    total = sum(inflight.get(r, 0) for r in candidates) + 1
    cap = math.ceil(bound * total / len(candidates))
    for rank in order:
        if inflight.get(rank, 0) + 1 <= cap:
            return rank, rank == order[0]
    return order[0], True  # unreachable: some rank is at or below the mean


def _text(content: Any) -> str:
    """A chat message's content as text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def prompt_prefix(body: bytes, chars: int) -> bytes | None:
    """The first `chars` characters of what the model will read first: a completion's prompt, or
    a chat's messages in order, each as `role` then content, the way chat templates lay them out
    (the template's own markup is the same for every request, so it changes no placement). None
    when the body has neither (the request is balanced by load)."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(request, dict):
        return None
    messages, prompt = request.get("messages"), request.get("prompt")
    if isinstance(messages, list):
        parts, size = [], 0
        for message in messages:
            if not isinstance(message, dict):
                continue
            piece = f"<{message.get('role')}>{_text(message.get('content'))}"
            parts.append(piece)
            size += len(piece)
            if size >= chars:
                break
        text = "".join(parts)
    elif isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        text = prompt[0]  # a batch: placed by its first prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt[:chars]):
        return b"tokens:" + ",".join(map(str, prompt[:chars // 4])).encode()  # ~4 characters a token
    else:
        return None
    return text[:chars].encode(errors="replace") if text else None


def session_key(headers: Sequence[tuple[bytes, bytes]], header: bytes, body: bytes) -> bytes | None:
    """The session a request belongs to: the `header` (lower case), else the body's `user`."""
    for name, value in headers:
        if name.lower() == header and value.strip():
            return b"h:" + value.strip()
    if b'"user"' not in body:
        return None
    try:
        user = json.loads(body).get("user")
    except (ValueError, UnicodeDecodeError, RecursionError, AttributeError):
        return None
    return b"u:" + user.encode(errors="replace") if isinstance(user, str) and user else None
