"""`round-robin`: the candidates in turn, whatever they hold."""

from __future__ import annotations

from collections.abc import Sequence

from vllm_dp_supervisor.router.policies.base import Policy, Routed
from vllm_dp_supervisor.router.policies.load import Load


class RoundRobin(Policy):
    def __init__(self, load: Load) -> None:
        super().__init__(load)
        self._turn = 0

    def pick(self, request: Routed, candidates: Sequence[int]) -> int:
        self._turn += 1
        return candidates[self._turn % len(candidates)]
