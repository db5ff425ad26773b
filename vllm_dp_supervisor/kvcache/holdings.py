"""What the ranks hold of one prompt: per rank, the prompt's leading blocks in its index. Pure.
The cache policy (router/policies/cache.py) weighs it against their load."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from vllm_dp_supervisor.kvcache.blocks import PromptBlocks
from vllm_dp_supervisor.kvcache.index import BlockIndex


@dataclasses.dataclass(frozen=True)
class Holdings:
    held: dict[int, int]  # per candidate: the prompt's leading blocks it holds
    blocks: float  # the prompt's full blocks (an estimate past what was read; 0: no block size known yet)
    indexed: dict[int, int]  # per candidate: the blocks it holds in all
    block_size: int  # tokens per block (0: no event told it yet)
    # The prompt's keys at placements.depths, as (tokens, key), and where the deepest of them went
    # last (rank, tokens), if this worker remembers (placements.py).
    remembered: tuple[tuple[int, int], ...] = ()
    recalled: tuple[int, int] | None = None
    tokens: float = 0.0  # the prompt's tokens (an estimate past what was read; 0: blocks x block_size)


def held_runs(prompt: PromptBlocks, indexes: Mapping[int, BlockIndex]) -> dict[int, int]:
    """Per rank, the leading blocks of `prompt` it holds; the prompt is read only as far as some
    rank holds it."""
    held = dict.fromkeys(indexes, 0)
    holding = list(indexes)
    i = 0
    while holding and (key := prompt.key(i)) is not None:
        holding = [r for r in holding if indexes[r].holds(key)]
        for r in holding:
            held[r] = i + 1
        i += 1
    return held
