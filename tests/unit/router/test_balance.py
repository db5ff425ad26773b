"""router/balance.py: which ready rank gets the next request. Pure."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from vllm_dp_supervisor.router.balance import Balancer
from vllm_dp_supervisor.settings.config import RouterPolicy

RANKS = st.lists(st.integers(0, 15), min_size=0, max_size=16, unique=True)


@given(ready=RANKS, excluded=RANKS, inflight=st.dictionaries(st.integers(0, 15), st.integers(0, 50)),
       coin=st.floats(0, 0.999))
def test_least_requests_picks_a_least_loaded_rank_never_an_excluded_one(ready, excluded, inflight, coin):
    balancer = Balancer(RouterPolicy.LEAST_REQUESTS, rand=lambda: coin)
    balancer.inflight.update(inflight)
    choice = balancer.choose(ready, excluded)
    candidates = [r for r in ready if r not in excluded]
    if not candidates:
        assert choice is None
        return
    assert choice in candidates
    assert inflight.get(choice, 0) == min(inflight.get(r, 0) for r in candidates)


def test_least_requests_breaks_ties_at_random_and_follows_the_counts():
    draws = iter([0.0, 0.5, 0.99])
    balancer = Balancer(RouterPolicy.LEAST_REQUESTS, rand=lambda: next(draws))
    assert [balancer.choose([0, 1]) for _ in range(3)] == [0, 1, 1]
    balancer.started(0)
    balancer.started(0)
    balancer.started(1)
    assert balancer.choose([0, 1]) == 1
    balancer.finished(0)
    balancer.finished(0)
    assert balancer.choose([0, 1]) == 0


@given(ready=st.lists(st.integers(0, 7), min_size=1, max_size=8, unique=True))
def test_round_robin_gives_each_ready_rank_its_turn(ready):
    balancer = Balancer(RouterPolicy.ROUND_ROBIN)
    picks = Counter(balancer.choose(ready) for _ in range(len(ready) * 5))
    assert picks == dict.fromkeys(ready, 5)
