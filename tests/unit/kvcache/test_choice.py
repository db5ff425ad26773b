"""choice.py: the rank that holds more of the prompt wins within the bound; load decides the rest."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from vllm_dp_supervisor.kvcache.blocks import PromptBlocks, block_keys
from vllm_dp_supervisor.kvcache.choice import choose, held_runs
from vllm_dp_supervisor.kvcache.index import BlockIndex


def first(): return 0.0


def test_the_rank_holding_the_prompt_wins_over_an_idle_one_within_the_bound():
    assert choose([0, 1], {0: 8, 1: 0}, 10, {0: 1, 1: 0}, {}, 1.25, 2.0, first) == 0


def test_a_rank_over_the_bound_is_passed_over_whatever_it_holds():
    assert choose([0, 1], {0: 10, 1: 0}, 10, {0: 6, 1: 0}, {}, 1.25, 2.0, first) == 1


def test_without_a_hit_it_is_least_requests_then_the_emptier_cache():
    assert choose([0, 1, 2], {}, 10, {0: 2, 1: 1, 2: 1}, {1: 50, 2: 10}, 1.25, 2.0, first) == 2


def test_a_prompt_under_one_block_goes_by_load():
    assert choose([0, 1], {0: 0, 1: 0}, 0.5, {0: 1, 1: 0}, {}, 1.25, 2.0, first) == 1


def test_ties_are_broken_by_the_random_draw():
    assert {choose([0, 1], {}, 4, {}, {}, 1.25, 2.0, lambda r=r: r) for r in (0.1, 0.9)} == {0, 1}


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 12)), min_size=2, max_size=6),
       st.integers(1, 20), st.floats(0.5, 4))
def test_a_rank_holding_more_than_one_over_weight_more_of_the_prompt_beats_any_within_the_bound(ranks, blocks,
                                                                                                 weight):
    held = {r: min(h, blocks) for r, (h, _) in enumerate(ranks)}
    inflight = {r: n for r, (_, n) in enumerate(ranks)}
    chosen = choose(list(held), held, blocks, inflight, {}, 1.25, weight, first)
    cap = math.ceil(1.25 * (sum(inflight.values()) + 1) / len(held))
    within = [r for r in held if inflight[r] + 1 <= cap]
    assert chosen in (within or list(held))
    for r in within:
        assert not (held[r] - held[chosen]) / blocks * weight > 1, (r, chosen)


def test_held_runs_read_the_prompt_only_while_a_rank_holds_it():
    a, b = BlockIndex(), BlockIndex()
    prompt = list(range(16))
    a.stored([1, 2, 3], None, prompt[:12], 4)
    b.stored([1], None, prompt[:4], 4)
    asked = []

    def pieces():
        for i in range(0, 16, 4):
            asked.append(i)
            yield prompt[i:i + 4]
    held = held_runs(PromptBlocks(pieces(), 4), {0: a, 1: b})
    assert held == {0: 3, 1: 1} and asked == [0, 4, 8, 12]  # the fourth block: held by none, read to know
    assert list(block_keys(prompt, 4))[:3] == [k for k in a._held]
