"""router/policies/least_requests.py: the fewest in flight, ties at random. Pure."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from policies_fakes import routed

from vllm_dp_supervisor.router.policies.least_requests import LeastRequests
from vllm_dp_supervisor.router.policies.load import Load

RANKS = st.lists(st.integers(0, 15), min_size=1, max_size=16, unique=True)
REQUEST = routed(b'{"prompt": "x"}')


@given(candidates=RANKS, inflight=st.dictionaries(st.integers(0, 15), st.integers(0, 50)), coin=st.floats(0, 0.999))
def test_least_requests_picks_a_least_loaded_candidate(candidates, inflight, coin):
    load = Load(1.25, rand=lambda: coin)
    load.inflight.update(inflight)
    choice = LeastRequests(load).pick(REQUEST, candidates)
    assert choice in candidates
    assert inflight.get(choice, 0) == min(inflight.get(r, 0) for r in candidates)


def test_least_requests_breaks_ties_at_random_and_follows_the_counts():
    draws = iter([0.0, 0.5, 0.99])
    policy = LeastRequests(Load(1.25, rand=lambda: next(draws)))
    assert [policy.pick(REQUEST, [0, 1]) for _ in range(3)] == [0, 1, 1]
    policy.load.started(0)
    policy.load.started(0)
    policy.load.started(1)
    assert policy.pick(REQUEST, [0, 1]) == 1
    policy.load.finished(0)
    policy.load.finished(0)
    assert policy.pick(REQUEST, [0, 1]) == 0
