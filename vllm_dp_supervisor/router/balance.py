"""Which ready rank gets the next request. Pure: the ranks and the randomness come in as values.

`least-requests` (the default): the rank with the fewest requests in flight from this worker,
ties broken at random, as nginx's least_conn and Envoy's least-request do per worker. Exact for
one worker; with several, each balances its own share. `round-robin`: in turn. `prefix` and
`session`: a request with a key (its prompt's first characters, its session) goes where that key
goes (affinity.py), within a bound on load; one without a key is balanced as least-requests.
`cache`: the request's placer (kvcache.CacheRouting.place) picks among the candidates; one it
cannot place is balanced as least-requests.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence

from vllm_dp_supervisor.router import affinity
from vllm_dp_supervisor.settings.config import RouterPolicy

# (candidates, in flight per rank) → a candidate, or None: balance it by load
Placer = Callable[[Sequence[int], Mapping[int, int]], int | None]


class Balancer:
    def __init__(self, policy: RouterPolicy, rand: Callable[[], float] = random.random, bound: float = 1.25) -> None:
        self.policy = policy
        self.bound = bound
        self.inflight: dict[int, int] = {}
        # Keyed placements: `home` (the key's first choice), `spilled` (the bound moved it on).
        self.placed: Counter[str] = Counter()
        self._rand = rand
        self._turn = 0

    def choose(self, ready: Sequence[int], excluded: Collection[int] = (), key: int | None = None,
               placer: Placer | None = None) -> int | None:
        """A rank of `ready` not in `excluded` (ranks that already failed this request), or None.
        `key`: the request's affinity key hash (prefix and session policies); `placer`: its
        placement by cache (cache policy)."""
        candidates = [r for r in ready if r not in excluded] if excluded else ready
        if not candidates:
            return None
        if placer is not None and (rank := placer(candidates, self.inflight)) is not None:
            return rank
        if key is not None:
            rank, home = affinity.place(key, candidates, self.inflight, self.bound)
            self.placed["home" if home else "spilled"] += 1
            return rank
        if self.policy is RouterPolicy.ROUND_ROBIN:
            self._turn += 1
            return candidates[self._turn % len(candidates)]
        least = min(self.inflight.get(r, 0) for r in candidates)
        tied = [r for r in candidates if self.inflight.get(r, 0) == least]
        if len(tied) == 1:
            return tied[0]
        return tied[int(self._rand() * len(tied)) % len(tied)]

    def started(self, rank: int) -> None:
        self.inflight[rank] = self.inflight.get(rank, 0) + 1

    def finished(self, rank: int) -> None:
        self.inflight[rank] -= 1
