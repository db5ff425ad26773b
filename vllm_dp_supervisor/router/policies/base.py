"""The interface every policy implements (one file each, beside this one), and the request as a
policy reads it. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from vllm_dp_supervisor.router.policies.load import Load


class Routed(Protocol):
    """What a policy reads of a request (client.Request, or a continuation's request)."""
    method: bytes
    path: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def json(self) -> dict[str, Any] | None: ...


class Policy:
    """Which of the candidate ranks (ready, not yet failed by this request; never empty) gets a
    request. `load` is shared with the router, which counts requests in and out of it."""

    def __init__(self, load: Load) -> None:
        self.load = load
        # The prompt tokens the last pick expects its rank's prefix cache to hit (the cache policy
        # only; None: no prediction). Read right after `pick`, before anything awaits.
        self.predicted: int | None = None

    def pick(self, request: Routed, candidates: Sequence[int]) -> int:
        raise NotImplementedError

    def follow(self, engines: Mapping[int, tuple[int, bool]]) -> None:
        """Each rank's current attempt and whether its engine keeps its cache (on every view)."""

    def checked(self, rank: int, predicted: int, cached: int) -> None:
        """What `rank` said its prefix cache hit of a request this policy predicted `predicted`
        tokens of (the answer's usage.prompt_tokens_details.cached_tokens)."""

    def cache_reset(self, rank: int) -> None:
        """`rank`'s engine said it emptied its prefix cache (a /reset_prefix_cache the router sent)."""

    def report(self) -> dict[str, Any]:
        """What the worker's stats message carries of this policy: `placed` (keyed policies)
        and `cache` (the cache policy), when it has them."""
        return {}

    def close(self) -> None:
        """The worker ends."""
