"""Where this router worker sent prompts lately: the affinity that outlives the engines' caches.
Pure, standard library only.

Under saturation the engines evict, the index (index.py) rightly says a prefix is held nowhere,
and a policy that knew only the index would place the next request for it by load: the prefix's
blocks get rebuilt on every rank in turn, exactly when prefill is scarce. Remembering where each
prefix went keeps it on one rank, where its blocks are rebuilt once and then hit.

What is remembered of a prompt: the keys (blocks.py) of its first MEMORY_BLOCK x 1, 2, 4, 8, ...
tokens, up to MEMORY_TOKENS, each mapped to the rank it went to last. The memory's own block, not
the engine's: placements are remembered from the first request on, before any engine has said its
block size (under saturation the first prefill, and so the first event, comes tens of seconds
after the first requests are placed). A later prompt is recalled by the deepest of its own such
keys found: a conversation's next turn shares its earlier turns' tokens, so it recalls their rank
and not merely the system prompt's. Bounded by count, least recently used first out: `limit`
entries of two ints (about 100 bytes each in CPython, a few MB at the default). Never credited as
a hit: the index says what an engine holds; this says only where the prefix would be rebuilt
(router/policies/cache.py weighs it below a held block).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence

MEMORY_TOKENS = 2048  # how deep into a prompt placements are remembered
MEMORY_BLOCK = 64  # tokens: the shortest prefix remembered, and the step of the depths


def depths() -> list[int]:
    """The prompt lengths, in tokens, whose keys are remembered: 64, 128, 256, ... 2,048."""
    out, depth = [], MEMORY_BLOCK
    while depth <= MEMORY_TOKENS:
        out.append(depth)
        depth *= 2
    return out


class Placements:
    def __init__(self, limit: int = 1 << 15) -> None:
        self.limit = limit
        self._rank_of: collections.OrderedDict[int, int] = collections.OrderedDict()  # key → rank

    def __len__(self) -> int:
        return len(self._rank_of)

    def remember(self, keys: Iterable[tuple[int, int]], rank: int) -> None:
        """The prompt whose keys at `depths` are `keys` ((tokens, key) pairs) was sent to `rank`."""
        for _, key in keys:
            self._rank_of[key] = rank
            self._rank_of.move_to_end(key)
        while len(self._rank_of) > self.limit:
            self._rank_of.popitem(last=False)

    def recall(self, keys: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
        """(rank, tokens) for the deepest of `keys` ((tokens, key) pairs, shallowest first)
        remembered, or None."""
        for tokens, key in reversed(keys):
            rank = self._rank_of.get(key)
            if rank is not None:
                self._rank_of.move_to_end(key)
                return rank, tokens
        return None
