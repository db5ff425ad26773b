"""What one engine holds in its prefix cache, as its KV events said: stored, removed, cleared.
Pure, standard library only; `feed.py` applies the events in sequence, and drops an index it
cannot trust (a new engine, a gap it could not repair).

Two maps: vLLM's block hash → our key (blocks.py), to place a stored block after its parent
and to forget a removed one, and our key → how many of the engine's blocks have it (two of vLLM's
hashes can share our key when they differ only by what it does not see). A stored block whose
parent this index never heard of cannot be keyed (its prefix is unknown) and is skipped: the
index may know less than the engine, never more. Its size is bounded by the engine's own cache
(one entry per block it holds); `limit` is a bound beside it, for an engine that never says
what it removed: past it, the index drops everything and says so.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Any

from vllm_dp_supervisor.kvcache.blocks import ROOT, block_key

INDEXED_MEDIA = (None, "GPU")  # vLLM's own cache; an offloading tier's blocks are not prefix hits


class BlockIndex:
    def __init__(self, limit: int = 1 << 22) -> None:
        self.limit = limit
        self._key_of: dict[Any, int] = {}  # vLLM's block hash → our key
        self._held: dict[int, int] = {}  # our key → the engine's blocks with it
        self.block_size: int | None = None  # as the engine said; None until its first store
        self.overflowed = 0  # times it passed `limit` and dropped everything

    def __len__(self) -> int:
        return len(self._key_of)

    def stored(self, hashes: Sequence[Any], parent: Any, tokens: Sequence[int], block_size: int,
               extras: Sequence[Hashable] | None = None, medium: str | None = None) -> int:
        """A `BlockStored`: blocks `hashes`, in order, after block `parent` (None: the prompt's
        start), with `tokens` (block_size each). Returns how many it placed: none of another medium
        or of another block size than the first store's (a hybrid model's other cache groups),
        none if their parent is unknown or the tokens do not fill them."""
        if medium not in INDEXED_MEDIA or block_size <= 0 or len(tokens) != len(hashes) * block_size \
                or self.block_size not in (None, block_size):
            return 0  # another block size than the first store's: not one the prompt is keyed by
        key = ROOT if parent is None else self._key_of.get(parent)
        if key is None:
            return 0
        self.block_size = block_size
        for i, vllm_hash in enumerate(hashes):
            extra = extras[i] if extras is not None and i < len(extras) else None
            key = block_key(key, tokens[i * block_size:(i + 1) * block_size], extra)
            if vllm_hash in self._key_of:
                continue  # the same block told twice (a replay overlapping what was read)
            self._key_of[vllm_hash] = key
            self._held[key] = self._held.get(key, 0) + 1
        if len(self._key_of) > self.limit:
            self.overflowed += 1
            self.cleared()
        return len(hashes)

    def removed(self, hashes: Iterable[Any], medium: str | None = None) -> None:
        if medium not in INDEXED_MEDIA:
            return
        for vllm_hash in hashes:
            key = self._key_of.pop(vllm_hash, None)
            if key is None:
                continue
            left = self._held[key] - 1
            if left:
                self._held[key] = left
            else:
                del self._held[key]

    def cleared(self) -> None:
        self._key_of.clear()
        self._held.clear()

    def holds(self, key: int) -> bool:
        return key in self._held

    def run(self, keys: Iterable[int]) -> int:
        """How many of `keys`, from the first, the engine holds in a row (a prefix hit stops at the
        first block it lacks)."""
        count = 0
        for key in keys:
            if key not in self._held:
                break
            count += 1
        return count
