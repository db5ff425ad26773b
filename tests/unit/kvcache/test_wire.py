"""wire.py: vLLM 0.32's KV event batches read (encoded here as vLLM encodes them: standin_cache's
structs have its layout); what it does not know is skipped and counted, never raised."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from standin_cache import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch

from vllm_dp_supervisor.kvcache import wire

ENCODE = msgspec.msgpack.Encoder().encode


def frames(seq: int, events: list) -> list[bytes]:
    return [b"kv", seq.to_bytes(8, "big"), ENCODE(EventBatch(1.5, events, 0))]


def test_a_batch_of_each_kind_of_event_is_read():
    batch = wire.read_batch(frames(7, [
        BlockStored([1, 2], None, [5, 6, 7, 8], 2, None, "GPU", None),
        BlockRemoved([1], "GPU"),
        AllBlocksCleared(),
    ]))
    assert batch.seq == 7 and batch.unreadable == 0
    stored, removed, cleared = batch.events
    assert stored == wire.Stored([1, 2], None, [5, 6, 7, 8], 2, None, "GPU")
    assert removed == wire.Removed([1], "GPU") and cleared == wire.Cleared()


def test_the_events_are_maps_tagged_by_type_as_vllm_encodes_them():
    payload = msgspec.msgpack.decode(frames(0, [BlockRemoved([3], None)])[2])
    assert payload[1] == [{"type": "BlockRemoved", "block_hashes": [3], "medium": None}]


def test_bytes_hashes_a_lora_and_extra_keys_are_kept_apart_from_plain_blocks():
    stored = wire.read_batch(frames(0, [BlockStored([b"\x01" * 32], b"\x02" * 32, [1, 2], 2, 1, None, "adapter",
                                                    extra_keys=[["adapter"]])])).events[0]
    assert isinstance(stored, wire.Stored) and stored.hashes == [b"\x01" * 32] and stored.parent == b"\x02" * 32
    assert stored.extras == ["('adapter', ['adapter'])"]


def test_an_event_of_another_kind_or_cache_group_is_skipped():
    unknown = msgspec.msgpack.encode({"type": "BlockMoved", "block_hashes": [1]})
    payload = msgspec.msgpack.encode([1.0, [msgspec.Raw(unknown), msgspec.Raw(ENCODE(BlockRemoved([1], None)))], 0])
    batch = wire.read_batch([b"", (3).to_bytes(8, "big"), payload])
    assert batch.unreadable == 1 and batch.events == [wire.Removed([1], None)]
    other_group = wire.read_batch(frames(0, [BlockRemoved([1], None, group_idx=1)]))
    assert other_group.events == [] and other_group.unreadable == 0


def test_a_replay_is_asked_and_read_as_vllm_serves_it():
    assert wire.replay_request(5) == [b"", (5).to_bytes(8, "big")]
    batch = wire.read_replayed([b"", *frames(5, [AllBlocksCleared()])])
    assert batch is not None and batch.seq == 5
    assert wire.read_replayed([b"", b"", (-1).to_bytes(8, "big", signed=True), b""]) is None


@pytest.mark.parametrize("bad", [[b"a", b"b"], [b"", b"\x00" * 7, b""], [b"", b"\x00" * 8, b"\xc1"],
                                 [b"", b"\x00" * 8, msgspec.msgpack.encode({"not": "a batch"})]])
def test_what_is_not_a_batch_is_a_wire_error(bad):
    with pytest.raises(wire.WireError):
        wire.read_batch(bad)


@given(st.lists(st.binary(max_size=40), min_size=3, max_size=3))
def test_any_frames_are_read_or_refused_with_a_wire_error(given_frames):
    try:
        wire.read_batch(given_frames)
    except wire.WireError:
        pass
