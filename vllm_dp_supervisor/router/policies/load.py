"""What every policy weighs: the requests this worker has in flight on each rank, the bound on
load (--router-load-bound) and the tie-break, each written here once. Pure: the randomness comes
in as a value.

The bound: a rank is passed over while one more request would put it above ceil(bound x mean),
the mean counting this request, so no key, prefix or cache can pull more than that share onto one
rank. Ties go at random, as nginx's least_conn and Envoy's least-request break them per worker.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence


class Load:
    def __init__(self, bound: float, rand: Callable[[], float] = random.random) -> None:
        self.bound = bound
        self.inflight: dict[int, int] = {}  # rank → this worker's requests in flight there
        self._rand = rand

    def started(self, rank: int) -> None:
        self.inflight[rank] = self.inflight.get(rank, 0) + 1

    def finished(self, rank: int) -> None:
        self.inflight[rank] -= 1

    def of(self, rank: int) -> int:
        return self.inflight.get(rank, 0)

    def cap(self, candidates: Sequence[int]) -> int:
        """The most requests a candidate may hold, this one included, within the bound."""
        total = sum(self.of(r) for r in candidates) + 1
        return math.ceil(self.bound * total / len(candidates))

    def within(self, candidates: Sequence[int]) -> list[int]:
        """The candidates that may take one more request within the bound (never empty: a rank at or
        below the mean always may)."""
        cap = self.cap(candidates)
        return [r for r in candidates if self.of(r) + 1 <= cap] or list(candidates)

    def least(self, candidates: Sequence[int]) -> int:
        """A candidate with the fewest requests in flight."""
        fewest = min(self.of(r) for r in candidates)
        return self.tie([r for r in candidates if self.of(r) == fewest])

    def tie(self, tied: Sequence[int]) -> int:
        """One of equally good candidates, at random."""
        return tied[0] if len(tied) == 1 else tied[int(self._rand() * len(tied)) % len(tied)]
