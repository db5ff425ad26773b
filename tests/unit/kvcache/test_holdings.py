"""kvcache/holdings.py: what each rank holds of a prompt, read only as far as some rank holds it."""

from __future__ import annotations

from vllm_dp_supervisor.kvcache.blocks import PromptBlocks, block_keys
from vllm_dp_supervisor.kvcache.holdings import held_runs
from vllm_dp_supervisor.kvcache.index import BlockIndex


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
