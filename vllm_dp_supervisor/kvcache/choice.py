"""Which rank a prompt goes to by what the ranks hold: pure, no I/O, no clock.

Among the candidates within the bound on load (as the prefix policy's: a rank is skipped while
one more request would put it above ceil(bound x mean)), each gets

    score = weight x (leading blocks of the prompt it holds / the prompt's blocks)
            - (its requests in flight / the bound's cap)

and the highest wins; ties go to fewer requests in flight, then to the rank holding fewer
blocks (room in its cache: new prefixes spread over the ranks), then at random. Both terms are
between 0 and 1 (the load term at most 1 within the bound), so a rank holding a share of the
prompt larger than another's by more than 1/weight wins over it whatever their loads within the
bound: no rank is sent a prompt only because it is idle while another holds most of it
(weight 2, the default). A prompt shorter than one block is placed by load alone, as
least-requests places it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

from vllm_dp_supervisor.kvcache.blocks import PromptBlocks
from vllm_dp_supervisor.kvcache.index import BlockIndex

DEFAULT_WEIGHT = 2.0


@dataclasses.dataclass(frozen=True)
class Choice:
    rank: int
    held: int  # leading blocks the chosen rank holds (the router's predicted hit)
    blocks: int  # the prompt's full blocks, as far as they were read (at least `held`)


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


def choose(candidates: Sequence[int], held: Mapping[int, int], blocks: float, inflight: Mapping[int, int],
           indexed: Mapping[int, int], bound: float, weight: float, rand: Callable[[], float]) -> int:
    """The rank for a prompt of `blocks` blocks (an estimate past what was read), of which each
    candidate holds `held[rank]` leading ones. `indexed`: blocks each rank holds in all."""
    total = sum(inflight.get(r, 0) for r in candidates) + 1
    cap = math.ceil(bound * total / len(candidates))
    within = [r for r in candidates if inflight.get(r, 0) + 1 <= cap] or list(candidates)

    def rank_key(r: int) -> tuple[float, int, int]:
        share = held.get(r, 0) / blocks if blocks >= 1 else 0.0
        score = weight * share - inflight.get(r, 0) / cap
        return -score, inflight.get(r, 0), indexed.get(r, 0)

    best = min(rank_key(r) for r in within)
    tied = [r for r in within if rank_key(r) == best]
    return tied[0] if len(tied) == 1 else tied[int(rand() * len(tied)) % len(tied)]
