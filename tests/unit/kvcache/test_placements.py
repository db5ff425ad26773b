"""placements.py: where a worker sent each prefix last, recalled by the deepest key a prompt
shares with it, bounded by count. Pure, with hypothesis."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vllm_dp_supervisor.kvcache.placements import MEMORY_BLOCK, MEMORY_TOKENS, Placements, depths


def test_depths_double_from_the_memory_s_block_to_its_depth():
    assert depths() == [64, 128, 256, 512, 1024, 2048] and depths()[-1] == MEMORY_TOKENS
    assert depths()[0] == MEMORY_BLOCK


def test_a_conversation_s_next_turn_recalls_its_own_rank_not_its_system_prompt_s():
    memory = Placements()
    memory.remember([(1, 10), (2, 11), (4, 12)], rank=0)  # a system prompt, then turn 1 of chat A
    memory.remember([(1, 10), (2, 21)], rank=1)  # the same system prompt, chat B
    assert memory.recall([(1, 10), (2, 11), (4, 12), (8, 13)]) == (0, 4)  # chat A's turn 2
    assert memory.recall([(1, 10), (2, 99)]) == (1, 1)  # a new chat: the system prompt's last rank
    assert memory.recall([(1, 77)]) is None


@given(st.lists(st.tuples(st.lists(st.integers(0, 50), min_size=1, max_size=4), st.integers(0, 3)), max_size=200),
       st.integers(1, 20))
def test_bounded_by_count_and_the_last_placement_wins(placed, limit):
    memory = Placements(limit)
    last: dict[int, int] = {}
    for keys, rank in placed:
        memory.remember([(i + 1, k) for i, k in enumerate(keys)], rank)
        last.update(dict.fromkeys(keys, rank))
        assert len(memory) <= limit
    for key, rank in last.items():
        recalled = memory.recall([(1, key)])
        assert recalled is None or recalled == (rank, 1)


def test_the_manual_states_the_memory_s_numbers():
    from harness import ROOT

    from vllm_dp_supervisor.router.policies.cache import RECALLED_SHARE

    page = " ".join((ROOT / "docs" / "router.md").read_text().split())
    assert f"up to {MEMORY_TOKENS:,} tokens, {Placements().limit:,} keys at most" in page
    assert f"its first {', '.join(str(d) for d in depths()[:3])}, ... tokens" in page
    assert f"its own {MEMORY_BLOCK}-token blocks" in page
    assert f"and at least its first {MEMORY_TOKENS:,} tokens" in page
    assert RECALLED_SHARE == 0.5 and "is credited half of those tokens" in page
