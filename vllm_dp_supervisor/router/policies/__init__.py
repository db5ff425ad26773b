"""Which ready rank gets a request: one file per --router-policy, one interface (`base.Policy`),
the load bound and the tie-break written once (`load.py`), and `build`, the one place a policy's
name is read. A new policy is one file and one line in `build`'s table.

- `least_requests.py`: the fewest requests in flight (the default);
- `round_robin.py`: in turn;
- `prefix.py`, `session.py`: by a key (the prompt's first characters, the session), rendezvous
  hashing within the bound (`keyed.py`);
- `cache.py`: by what each engine's KV cache holds of the prompt (kvcache/, loaded under it only).

Must never: do I/O on a request's path (the cache policy reads what its feeds already indexed), or
keep state per key (memory must not grow with the prompts seen).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from vllm_dp_supervisor.router.policies import cache
from vllm_dp_supervisor.router.policies.base import Policy, Routed
from vllm_dp_supervisor.router.policies.least_requests import LeastRequests
from vllm_dp_supervisor.router.policies.load import Load
from vllm_dp_supervisor.router.policies.prefix import Prefix
from vllm_dp_supervisor.router.policies.round_robin import RoundRobin
from vllm_dp_supervisor.router.policies.session import Session
from vllm_dp_supervisor.settings.config import RouterPolicy, RouterSettings

__all__ = ["Load", "Policy", "Routed", "build"]


def build(settings: RouterSettings, rand: Callable[[], float] = random.random) -> Policy:
    """The worker's policy, as --router-policy names it, over a fresh load count."""
    load = Load(settings.load_bound, rand)
    builders: dict[RouterPolicy, Callable[[], Policy]] = {
        RouterPolicy.LEAST_REQUESTS: lambda: LeastRequests(load),
        RouterPolicy.ROUND_ROBIN: lambda: RoundRobin(load),
        RouterPolicy.PREFIX: lambda: Prefix(load, settings.prefix_chars),
        RouterPolicy.SESSION: lambda: Session(load, settings.session_header),
        RouterPolicy.CACHE: lambda: cache.build(load, settings),  # loads kvcache/ (ZMQ, the tokenizer) only now
    }
    return builders[settings.policy]()
