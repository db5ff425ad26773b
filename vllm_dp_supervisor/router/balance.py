"""Which ready rank gets the next request. Pure: the ranks and the randomness come in as values.

`least-requests` (the default): the rank with the fewest requests in flight from this worker,
ties broken at random, as nginx's least_conn and Envoy's least-request do per worker. Exact for
one worker; with several, each balances its own share. `round-robin`: in turn. A policy that
looks at the request (prefix affinity) plugs in as another `choose`.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Collection, Sequence


class RouterPolicy(enum.Enum):
    LEAST_REQUESTS = "least-requests"
    ROUND_ROBIN = "round-robin"


class Balancer:
    def __init__(self, policy: RouterPolicy, rand: Callable[[], float] = random.random) -> None:
        self.policy = policy
        self.inflight: dict[int, int] = {}
        self._rand = rand
        self._turn = 0

    def choose(self, ready: Sequence[int], excluded: Collection[int] = ()) -> int | None:
        """A rank of `ready` not in `excluded` (ranks that already failed this request), or None."""
        candidates = [r for r in ready if r not in excluded]
        if not candidates:
            return None
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
