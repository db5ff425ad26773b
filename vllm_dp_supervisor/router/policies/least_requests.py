"""`least-requests` (the default): the rank with the fewest requests in flight from this worker,
ties at random, as nginx's least_conn and Envoy's least-request do per worker. Exact for one
worker; with several, each balances its own share."""

from __future__ import annotations

from collections.abc import Sequence

from vllm_dp_supervisor.router.policies.base import Policy, Routed


class LeastRequests(Policy):
    def pick(self, request: Routed, candidates: Sequence[int]) -> int:
        return self.load.least(candidates)
