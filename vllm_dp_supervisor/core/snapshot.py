"""A frozen picture of the pod, published by the state machine on every change it makes.

Readers (the API's probes, the metrics, the router to come) read `Snapshots.current`: a consistent
view of every rank at one moment, never a half-written record, at the cost of an attribute read.
A reader that must act on the next change (`await snapshots.next(version)`) is woken when it is
published. Only the supervisor publishes; nothing here writes rank state.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from vllm_dp_supervisor.core.states import CACHING, SERVING, RankState, SupervisorState


@dataclasses.dataclass(frozen=True)
class RankView:
    rank: int
    port: int
    pid: int | None
    state: RankState
    attempt: int
    restarts: int
    ready_after_s: float | None = None  # this attempt's start to its first 200 from /health
    started_monotonic: float | None = None  # when this attempt's process started (time.monotonic)

    @property
    def serving(self) -> bool:
        return self.state in SERVING

    @property
    def caching(self) -> bool:
        """Its attempt's engine runs and keeps what it cached (the cache policy's index of it holds)."""
        return self.state in CACHING


@dataclasses.dataclass(frozen=True)
class PodView:
    version: int
    state: SupervisorState
    draining: bool
    min_ready_ranks: int
    ranks: tuple[RankView, ...]

    @property
    def live(self) -> bool:
        return self.state is SupervisorState.RUNNING

    @property
    def ready_ranks(self) -> int:
        return sum(r.serving for r in self.ranks)

    @property
    def ready(self) -> bool:
        """/ready: running, not drained, and at least --min-ready-ranks ranks serving."""
        return self.live and not self.draining and self.ready_ranks >= self.min_ready_ranks

    def rank_ready(self, rank: int) -> bool:
        """/ready/<rank>: that rank may take traffic."""
        return self.live and not self.draining and self.ranks[rank].serving

    def not_ready(self) -> list[dict[str, Any]]:
        return [{"rank": r.rank, "state": r.state.value} for r in self.ranks if not r.serving]


class Snapshots:
    """The latest `PodView`, with a version that grows by one at each publication."""

    def __init__(self, first: PodView) -> None:
        self.current = dataclasses.replace(first, version=1)
        self._changed = asyncio.Event()

    def publish(self, view: PodView) -> PodView:
        """Make `view` current (its version is set here) and wake whoever awaits a change."""
        self.current = dataclasses.replace(view, version=self.current.version + 1)
        self._changed.set()
        self._changed = asyncio.Event()
        return self.current

    async def next(self, after: int) -> PodView:
        """The first view newer than version `after` (at once if there is one already)."""
        while self.current.version <= after:
            await self._changed.wait()
        return self.current
