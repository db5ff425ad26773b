"""router/policies/round_robin.py: each ready rank its turn, whatever it holds. Pure."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st
from policies_fakes import routed

from vllm_dp_supervisor.router.policies.load import Load
from vllm_dp_supervisor.router.policies.round_robin import RoundRobin

REQUEST = routed(b'{"prompt": "x"}')


@given(ready=st.lists(st.integers(0, 7), min_size=1, max_size=8, unique=True))
def test_round_robin_gives_each_ready_rank_its_turn(ready):
    policy = RoundRobin(Load(1.25))
    picks = Counter(policy.pick(REQUEST, ready) for _ in range(len(ready) * 5))
    assert picks == dict.fromkeys(ready, 5)
