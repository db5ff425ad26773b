"""router/policies/load.py: the bound on load, written once for every policy. Pure."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vllm_dp_supervisor.router.policies.load import Load


@given(inflight=st.lists(st.integers(0, 30), min_size=1, max_size=8), bound=st.floats(1.0, 3.0))
def test_the_bound_always_leaves_a_candidate_and_never_one_above_the_cap(inflight, bound):
    load = Load(bound)
    load.inflight.update(enumerate(inflight))
    candidates = list(range(len(inflight)))
    within = load.within(candidates)
    assert within and all(load.of(r) + 1 <= load.cap(candidates) for r in within)


def test_ties_go_at_random_and_counts_follow_requests_in_and_out():
    load = Load(1.25, rand=lambda: 0.99)
    assert load.tie([3, 5, 7]) == 7 and load.tie([4]) == 4
    load.started(2)
    load.started(2)
    load.finished(2)
    assert load.of(2) == 1 and load.of(9) == 0
