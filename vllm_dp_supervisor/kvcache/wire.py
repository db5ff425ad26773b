"""vLLM's KV-cache events as they come off the wire, read into what the index needs: the one place
their encoding is known (vLLM 0.32, `vllm/distributed/kv_events.py`; tests/vllm pins it against
the real engine).

A batch is three ZMQ frames: a topic, an 8-byte big-endian sequence number (0 for an engine's
first batch), and a msgpack `EventBatch`, an array `[ts, events, data_parallel_rank]` whose events
are maps tagged by `type`: `BlockStored` (block_hashes, parent_block_hash, token_ids, block_size,
lora_name, medium, extra_keys, group_idx, ...), `BlockRemoved` (block_hashes, medium, group_idx)
and `AllBlocksCleared`. A block hash is a 64-bit integer (vLLM's default) or bytes. A replay
request to the engine's ROUTER endpoint is the first sequence number wanted, 8 bytes big-endian;
the answer is one batch per message and an end marker whose sequence number is -1.

An event of a kind this module does not know, or one it cannot read, is skipped and counted; a
field vLLM adds later is ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import Any

import msgspec

SEQ_BYTES = 8
END_OF_REPLAY = -1


class _BlockStored(msgspec.Struct, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


class _BlockRemoved(msgspec.Struct, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None = None
    group_idx: int | None = None


class _AllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared"):
    pass


class _Batch(msgspec.Struct, array_like=True):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


_batch = msgspec.msgpack.Decoder(_Batch)
_event = msgspec.msgpack.Decoder(_BlockStored | _BlockRemoved | _AllBlocksCleared)


@dataclasses.dataclass(frozen=True)
class Stored:
    hashes: Sequence[Any]
    parent: Any
    tokens: Sequence[int]
    block_size: int
    extras: Sequence[Hashable] | None
    medium: str | None


@dataclasses.dataclass(frozen=True)
class Removed:
    hashes: Sequence[Any]
    medium: str | None


@dataclasses.dataclass(frozen=True)
class Cleared:
    pass


Event = Stored | Removed | Cleared


@dataclasses.dataclass(frozen=True)
class Batch:
    seq: int
    events: list[Event]
    unreadable: int  # events skipped: an unknown kind, or one that did not decode


class WireError(ValueError):
    """A message that is not a batch at all (its frames or its payload)."""


def read_seq(frame: bytes) -> int:
    if len(frame) != SEQ_BYTES:
        raise WireError(f"a sequence number is {SEQ_BYTES} bytes, not {len(frame)}")
    return int.from_bytes(frame, "big", signed=True)


def read_batch(frames: Sequence[bytes]) -> Batch:
    """A published message: [topic, seq, payload]."""
    if len(frames) != 3:
        raise WireError(f"a batch is 3 frames, not {len(frames)}")
    seq = read_seq(frames[1])
    try:
        batch = _batch.decode(frames[2])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise WireError(f"batch {seq}: {exc}") from None
    events: list[Event] = []
    unreadable = 0
    for raw in batch.events:
        try:
            event = _event.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            unreadable += 1
            continue
        if isinstance(event, _AllBlocksCleared):
            events.append(Cleared())
        elif event.group_idx not in (None, 0):
            continue  # a hybrid model's other cache groups: a prefix hit needs the first one anyway
        elif isinstance(event, _BlockStored):
            events.append(_stored(event))
        else:
            events.append(Removed(event.block_hashes, event.medium))
    return Batch(seq, events, unreadable)


def _stored(event: _BlockStored) -> Stored:
    extras: list[Hashable] | None = None
    if event.extra_keys is not None or event.lora_name is not None:
        given = event.extra_keys or [None] * len(event.block_hashes)
        extras = [None if e is None and event.lora_name is None else repr((event.lora_name, e)) for e in given]
    return Stored(event.block_hashes, event.parent_block_hash, event.token_ids, event.block_size, extras, event.medium)


def replay_request(start: int) -> list[bytes]:
    """What a DEALER sends the engine's replay endpoint to get every batch from `start` on."""
    return [b"", start.to_bytes(SEQ_BYTES, "big")]


def read_replayed(frames: Sequence[bytes]) -> Batch | None:
    """One answer to a replay request ([empty, topic, seq, payload]); None at its end marker."""
    if len(frames) != 4:
        raise WireError(f"a replayed batch is 4 frames, not {len(frames)}")
    if read_seq(frames[2]) == END_OF_REPLAY:
        return None
    return read_batch(frames[1:])
