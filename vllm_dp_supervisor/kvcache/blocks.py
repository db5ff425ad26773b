"""Block keys: what the router calls a block of a prompt, computed the same way from the tokens a
request will be given and from the tokens an engine says it stored. Pure, standard library only.

A key is a hash of the block's tokens chained to its parent's key, so two equal keys mean the
same tokens from the prompt's start. It is ours, not vLLM's block hash: vLLM's depends on its
`--prefix-caching-hash-algo`, on a per-process seed unless PYTHONHASHSEED is set, and on its
version, and a `BlockStored` event carries the tokens, so the router keys what it reads by
content and keeps vLLM's hashes only as names for the blocks it will hear removed. Python's
hash of a tuple of ints is the same in every process (no per-process seed), and 64 bits: a
collision costs a misrouted request, never a wrong answer.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence

ROOT = 0  # the parent key of a prompt's first block


def block_key(parent: int, tokens: Sequence[int], extra: Hashable = None) -> int:
    """The key of a block of `tokens` after the block keyed `parent`. `extra`: what else vLLM
    keys that block by (a LoRA, a cache salt, images); a request routed by its text alone has
    none, so a block stored with one never matches it, as in the engine."""
    return hash((parent, extra, tuple(tokens)))


def block_keys(tokens: Sequence[int], block_size: int, parent: int = ROOT) -> Iterator[int]:
    """The keys of every full block of `tokens` (a partial last block is never cached)."""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = block_key(parent, tokens[start:start + block_size])
        yield parent


class PromptBlocks:
    """A prompt's block keys, computed as far as they are asked for, from its token ids given a
    piece at a time (prompts.PromptReader.token_pieces)."""

    def __init__(self, pieces: Iterator[Sequence[int]], block_size: int) -> None:
        self._pieces = pieces
        self.block_size = block_size
        self.keys: list[int] = []  # computed so far
        self.tokens = 0  # read so far
        self.ended = False  # every piece read: `keys` is every full block
        self._pending: list[int] = []

    def key(self, i: int) -> int | None:
        """The key of block `i`, or None if the prompt has fewer full blocks."""
        while len(self.keys) <= i:
            if len(self._pending) >= self.block_size:
                block, self._pending = self._pending[:self.block_size], self._pending[self.block_size:]
                self.keys.append(block_key(self.keys[-1] if self.keys else ROOT, block))
                continue
            piece = next(self._pieces, None)
            if piece is None:
                self.ended = True
                return None
            self.tokens += len(piece)
            self._pending.extend(piece)
        return self.keys[i]
