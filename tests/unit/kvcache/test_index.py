"""index.py and blocks.py: an engine's blocks as its events say, keyed by content, never knowing
more than the engine."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vllm_dp_supervisor.kvcache.blocks import ROOT, PromptBlocks, block_key, block_keys
from vllm_dp_supervisor.kvcache.index import BlockIndex

BS = 4


def keys(tokens, parent=ROOT):
    return list(block_keys(tokens, BS, parent))


def test_a_prompt_stored_in_two_events_is_held_from_its_start():
    index = BlockIndex()
    prompt = list(range(100, 114))  # three full blocks and two tokens
    assert index.stored([11, 12], None, prompt[:8], BS) == 2
    assert index.stored([13], 12, prompt[8:12], BS) == 1
    assert index.run(keys(prompt)) == 3 and len(index) == 3
    assert index.run(keys([*prompt[:8], 0, 0, 0, 0])) == 2  # a different third block
    assert index.run(keys([1, *prompt[1:]])) == 0  # a different first one: nothing, as in the engine


def test_a_removed_block_ends_the_run_there_and_a_cleared_index_holds_nothing():
    index = BlockIndex()
    index.stored([1, 2, 3], None, list(range(12)), BS)
    index.removed([2])
    assert index.run(keys(list(range(12)))) == 1
    index.removed([99])  # unknown: ignored
    index.cleared()
    assert len(index) == 0 and index.run(keys(list(range(12)))) == 0


def test_a_block_whose_parent_it_never_heard_of_is_skipped_not_guessed():
    index = BlockIndex()
    assert index.stored([5], 4, [1, 2, 3, 4], BS) == 0
    assert len(index) == 0


def test_an_offloaded_or_malformed_store_is_not_indexed():
    index = BlockIndex()
    assert index.stored([1], None, [1, 2, 3, 4], BS, medium="CPU") == 0
    assert index.stored([1], None, [1, 2, 3], BS) == 0  # tokens do not fill the block
    index.stored([1], None, [1, 2, 3, 4], BS)
    index.removed([1], medium="CPU")
    assert len(index) == 1


def test_a_store_of_another_block_size_than_the_first_is_not_indexed():
    """A hybrid model's cache groups have their own block sizes: the first store's is the index's."""
    index = BlockIndex()
    assert index.stored([1], None, [1, 2, 3, 4], BS) == 1
    assert index.stored([2], None, [1, 2, 3, 4, 5, 6, 7, 8], 2 * BS) == 0
    assert index.block_size == BS and len(index) == 1


def test_a_block_stored_with_extra_keys_never_matches_a_plain_prompt():
    index = BlockIndex()
    index.stored([1], None, [1, 2, 3, 4], BS, extras=["('lora-a', None)"])
    assert index.run(keys([1, 2, 3, 4])) == 0


def test_two_engine_blocks_with_one_key_are_held_until_both_are_removed():
    index = BlockIndex()
    index.stored([1], None, [1, 2, 3, 4], BS)
    index.stored([2], None, [1, 2, 3, 4], BS)  # same tokens, another hash (e.g. a salt it does not see)
    index.removed([1])
    assert index.run(keys([1, 2, 3, 4])) == 1
    index.removed([2])
    assert index.run(keys([1, 2, 3, 4])) == 0


def test_past_its_limit_an_index_drops_everything_and_says_so():
    index = BlockIndex(limit=2)
    index.stored([1, 2, 3], None, list(range(12)), BS)
    assert len(index) == 0 and index.overflowed == 1


@given(st.lists(st.integers(0, 300), max_size=60), st.integers(1, 7), st.integers(1, 50))
def test_prompt_blocks_read_in_any_pieces_give_the_keys_of_the_whole(tokens, size, piece):
    pieces = (tokens[i:i + piece] for i in range(0, len(tokens), piece))
    reading = PromptBlocks(pieces, size)
    got, i = [], 0
    while (key := reading.key(i)) is not None:
        got.append(key)
        i += 1
    assert got == list(block_keys(tokens, size)) and reading.ended and reading.tokens == len(tokens)


def test_prompt_blocks_read_only_as_far_as_asked():
    read = []

    def pieces():
        for p in ([1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]):
            read.append(p)
            yield p
    reading = PromptBlocks(pieces(), 4)
    assert reading.key(0) == block_key(ROOT, [1, 2, 3, 4]) and len(read) == 1 and not reading.ended
