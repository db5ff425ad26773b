"""What the keyed policies (`prefix`, `session`) share: a key pins a request to a rank by
rendezvous hashing (highest random weight), within the bound on load (load.py). Pure.

Each candidate gets a weight from (key, rank); the heaviest takes the request unless the bound
passes it over, then the next in weight order. When a rank leaves rotation only its keys move,
and they come back when it returns; a deterministic mix (not Python's per-process `hash`) makes
every worker agree. A request without a key is balanced as least-requests.

The router remembers nothing per key: memory does not grow with the number of prompts (a prefix
trie did, and OOM-killed a router in production: vllm-project/production-stack#687).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

from vllm_dp_supervisor.router.policies.base import Policy, Routed
from vllm_dp_supervisor.router.policies.load import Load

MASK = (1 << 64) - 1


def mix(key: int, rank: int) -> int:
    """splitmix64 of key and rank: a well-spread 64-bit weight, the same in every process."""
    z = (key ^ ((rank + 1) * 0x9E3779B97F4A7C15)) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def key_hash(key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def place(key: int, candidates: Sequence[int], load: Load) -> tuple[int, bool]:
    """The rank for `key` among `candidates` (not empty) within the bound, and whether it is the
    key's first choice."""
    order = sorted(candidates, key=lambda r: mix(key, r), reverse=True)
    within = set(load.within(candidates))
    rank = next(r for r in order if r in within)
    return rank, rank == order[0]


class Keyed(Policy):
    """A policy that pins a request by its key (`key`), else balances it by load."""

    def __init__(self, load: Load) -> None:
        super().__init__(load)
        # Keyed placements: `home` (the key's first choice), `spilled` (the bound moved it on).
        self.placed: Counter[str] = Counter()

    def key(self, request: Routed) -> bytes | None:
        raise NotImplementedError

    def pick(self, request: Routed, candidates: Sequence[int]) -> int:
        key = self.key(request)
        if key is None:
            return self.load.least(candidates)
        rank, home = place(key_hash(key), candidates, self.load)
        self.placed["home" if home else "spilled"] += 1
        return rank

    def report(self) -> dict[str, Any]:
        return {"placed": dict(self.placed)}


