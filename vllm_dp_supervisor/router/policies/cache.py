"""`cache`: each prompt goes to the rank whose KV cache holds the longest part of it, as vLLM's own
KV events say (kvcache/), weighed against the ranks' load. What the cache policy loads (ZMQ, the
tokenizer, jinja2) is imported by `build` only under it.

Among the candidates within the bound on load (load.py), each gets

    score = weight x (leading blocks of the prompt it holds / the prompt's blocks)
            - (its requests in flight / the bound's cap)

and the highest wins; ties go to fewer requests in flight, then to the rank holding fewer
blocks (room in its cache: new prefixes spread over the ranks), then at random. The rank this
worker last sent the prompt's prefix to (kvcache/placements.py) is credited RECALLED_SHARE of
that prefix's tokens, when it holds fewer: under saturation the engines evict, and without it a
prefix held nowhere would go by load alone and be rebuilt on every rank in turn; with it, it is
rebuilt where it went, once. Half, not all: a block held is a hit now, a remembered one only
keeps the prefix together (a rank holding the whole prefix still wins over one remembered). Both terms are
between 0 and 1 (the load term at most 1 within the bound), so a rank holding a share of the
prompt larger than another's by more than 1/weight wins over it whatever their loads within the
bound: no rank is sent a prompt only because it is idle while another holds most of it
(--router-cache-weight, 2 by default). A prompt shorter than one block, and one the cache cannot
read (kvcache.CacheRouting.holdings says why), is placed by load alone, as least-requests.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from vllm_dp_supervisor.router.policies.base import Policy, Routed
from vllm_dp_supervisor.router.policies.load import Load
from vllm_dp_supervisor.router.stats import LOOKUP_BUCKETS, Histogram
from vllm_dp_supervisor.settings.config import RouterSettings

if TYPE_CHECKING:
    from vllm_dp_supervisor.kvcache import CacheRouting
    from vllm_dp_supervisor.kvcache.holdings import Holdings


RECALLED_SHARE = 0.5


def choose(candidates: Sequence[int], holdings: Holdings, load: Load, weight: float) -> int:
    """The rank for a prompt, of which each candidate holds `holdings.held[rank]` leading blocks
    and the rank `holdings.recalled` names was sent its first tokens last."""
    cap = load.cap(candidates)
    size = holdings.block_size
    tokens = holdings.tokens or holdings.blocks * size
    recalled = holdings.recalled

    def rank_key(r: int) -> tuple[float, int, int]:
        held: float = holdings.held.get(r, 0) * size  # tokens
        if recalled is not None and recalled[0] == r:
            held = max(held, RECALLED_SHARE * recalled[1])
        share = held / tokens if tokens >= max(size, 1) else 0.0  # under one block: by load
        score = weight * share - load.of(r) / cap
        return -score, load.of(r), holdings.indexed.get(r, 0)

    within = load.within(candidates)
    best = min(rank_key(r) for r in within)
    return load.tie([r for r in within if rank_key(r) == best])


class Cache(Policy):
    def __init__(self, load: Load, cache: CacheRouting, weight: float) -> None:
        super().__init__(load)
        self.cache = cache
        self._weight = weight
        self.lookup = Histogram(LOOKUP_BUCKETS)  # a request's placement: reading its prompt, choosing

    def pick(self, request: Routed, candidates: Sequence[int]) -> int:
        started = time.perf_counter()
        self.predicted = None
        try:
            path = request.path.split(b"?", 1)[0].decode(errors="replace")
            holdings = self.cache.holdings(path, request.json(), candidates)
            if holdings is None:
                return self.load.least(candidates)
            rank = choose(candidates, holdings, self.load, self._weight)
            self.cache.placed(rank, holdings)
            if _checkable(request.json()):
                self.predicted = holdings.held.get(rank, 0) * holdings.block_size
            return rank
        finally:
            self.lookup.observe(time.perf_counter() - started)

    def checked(self, rank: int, predicted: int, cached: int) -> None:
        self.cache.checked(rank, predicted, cached)

    def cache_reset(self, rank: int) -> None:
        self.cache.reset(rank)

    def follow(self, engines: Mapping[int, tuple[int, bool]]) -> None:
        self.cache.follow(engines)

    def report(self) -> dict[str, Any]:
        return {"cache": {**self.cache.report(), "lookup": [self.lookup.counts, self.lookup.total]}}

    def close(self) -> None:
        self.cache.close()


def _checkable(request: Mapping[str, Any] | None) -> bool:
    """Whether the rank's cached_tokens will be this prediction's: one prompt, one sequence (a
    batch's usage tells its last prompt's; n > 1 and beam search run several requests)."""
    if request is None or request.get("n") not in (None, 1) or request.get("use_beam_search"):
        return False
    prompt = request.get("prompt")
    return not (isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list) and len(prompt) != 1)


def build(load: Load, settings: RouterSettings) -> Cache:
    from vllm_dp_supervisor.kvcache import CacheRouting, Endpoints
    endpoints = {rank: Endpoints(events, replay) for rank, events, replay in settings.kv_events}
    return Cache(load, CacheRouting(endpoints, settings.model, os.environ), settings.cache_weight)
