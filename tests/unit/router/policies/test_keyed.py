"""router/policies/keyed.py: where a key goes, the bound on load, what moves when a rank leaves,
and a hot key spilled and counted. Pure, with hypothesis."""

from __future__ import annotations

import math
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st
from policies_fakes import routed

from vllm_dp_supervisor.router.policies.keyed import Keyed, key_hash, place
from vllm_dp_supervisor.router.policies.load import Load

RANKS = st.lists(st.integers(0, 63), min_size=1, max_size=8, unique=True)
LOADS = st.dictionaries(st.integers(0, 63), st.integers(0, 50))
KEYS = st.integers(0, (1 << 64) - 1)


def load(inflight: dict[int, int] | None = None, bound: float = 1.25) -> Load:
    counts = Load(bound)
    counts.inflight.update(inflight or {})
    return counts


class ByBody(Keyed):
    """A keyed policy whose key is the request's body (empty: no key)."""
    def key(self, request):
        return request.body or None


@given(key=KEYS, ranks=RANKS, loads=LOADS, bound=st.floats(1.0, 3.0))
def test_a_key_never_pushes_a_rank_above_the_bound(key, ranks, loads, bound):
    rank, home = place(key, ranks, load(loads, bound))
    assert rank in ranks
    total = sum(loads.get(r, 0) for r in ranks) + 1
    assert loads.get(rank, 0) + 1 <= math.ceil(bound * total / len(ranks))
    if home:  # its first choice: the same rank whatever the load, when the load allows
        assert rank == place(key, ranks, load({}, bound))[0]


@given(key=KEYS, ranks=RANKS)
def test_with_equal_load_a_key_always_goes_to_the_same_rank_in_any_order(key, ranks):
    first, home = place(key, ranks, load())
    assert home and place(key, list(reversed(ranks)), load({r: 3 for r in ranks}))[0] == first


@given(keys=st.lists(KEYS, min_size=1, max_size=50), ranks=st.lists(st.integers(0, 63), min_size=2, max_size=8,
                                                                    unique=True))
def test_a_rank_leaving_moves_only_its_own_keys_and_they_come_back(keys, ranks):
    before = {k: place(k, ranks, load())[0] for k in keys}
    gone = ranks[0]
    after = {k: place(k, ranks[1:], load())[0] for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != gone)
    assert {k: place(k, ranks, load())[0] for k in keys} == before


def test_distinct_keys_spread_over_every_rank():
    counts = Counter(place(key_hash(b"prompt %d" % i), [0, 1, 2, 3], load())[0] for i in range(4000))
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 850  # 1000 each, give or take


def test_a_hot_key_spills_once_its_rank_is_above_the_bound_and_counts_it():
    policy = ByBody(load(bound=1.5))
    hot = routed(b"the same long system prompt")
    for _ in range(30):  # requests that never finish: the worst case for a hot key
        policy.load.started(policy.pick(hot, [0, 1, 2]))
    assert max(policy.load.inflight.values()) <= math.ceil(1.5 * 30 / 3)
    assert policy.placed["home"] >= 15 and policy.placed["spilled"] > 0
    assert policy.report() == {"placed": dict(policy.placed)} and sum(policy.placed.values()) == 30


def test_a_key_goes_to_the_next_rank_in_its_order_when_its_home_is_not_a_candidate():
    policy = ByBody(load())
    home = policy.pick(routed(b"x"), [0, 1, 2])
    others = [r for r in (0, 1, 2) if r != home]
    second = policy.pick(routed(b"x"), others)
    assert second in others and policy.pick(routed(b"x"), [*others, home]) == home
    assert place(key_hash(b"x"), others, load())[0] == second


def test_a_request_without_a_key_goes_by_load():
    policy = ByBody(load({0: 3, 1: 1}))
    assert policy.pick(routed(b""), [0, 1]) == 1 and policy.placed == {}
