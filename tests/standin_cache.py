"""The stand-in's prefix cache and its KV events, as vLLM 0.32 publishes them: a ZMQ PUB socket
sending [topic, 8-byte big-endian sequence number, msgpack EventBatch], the events map-encoded
and tagged by `type` (BlockStored, BlockRemoved, AllBlocksCleared), and a ROUTER replay endpoint
answering a start sequence number with every batch it still buffers from there, then a -1 marker.
Encoded here with structs laid out as vLLM's (`vllm/distributed/kv_events.py`), independently of
the router's reader (vllm_dp_supervisor/kvcache/wire.py): the real-vLLM test pins both.

Blocks are keyed as vLLM 0.32 keys them by default (sha256 of the pickled parent hash, block
tokens and extra keys; the first block's parent a fixed "none" hash; the last 8 bytes as an
integer). A request's prompt is looked up (a hit is its leading full blocks held, at most all
but its last token, as vLLM's scheduler counts it) and its full blocks stored; the least recently
used blocks are evicted past `capacity` and published as removed. One batch per request.

Loaded by standin.py only when it is given --kv-events-config (pyzmq and msgspec come with the
project's runtime dependencies).
"""

from __future__ import annotations

import collections
import hashlib
import pickle
import threading
import time
from typing import Any

import msgspec
import zmq

NONE_HASH = hashlib.sha256(pickle.dumps("vllm-none-hash", protocol=pickle.HIGHEST_PROTOCOL)).digest()
END_SEQ = (-1).to_bytes(8, "big", signed=True)


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.sha256(pickle.dumps((parent, tuple(tokens), None), protocol=pickle.HIGHEST_PROTOCOL)).digest()


def external(digest: bytes) -> int:
    return int.from_bytes(digest[-8:], "big")  # vLLM: the low 64 bits, as an unsigned integer


class PrefixCache:
    def __init__(self, config: dict[str, Any], block_size: int, capacity: int, skip: frozenset[int] = frozenset(),
                 buffer_steps: int | None = None) -> None:
        """`skip`: sequence numbers numbered but never sent (a gap the subscriber must repair)."""
        self.block_size, self.capacity, self.skip = block_size, capacity, skip
        self.held: collections.OrderedDict[bytes, None] = collections.OrderedDict()  # LRU, oldest first
        self.queries = self.hits = 0  # tokens, as vllm:prefix_cache_queries/hits count them
        self._lock = threading.Lock()
        self._seq = 0
        self._buffer: collections.deque[tuple[int, bytes]] = collections.deque(
            maxlen=buffer_steps or int(config.get("buffer_steps", 10_000)))
        self._topic = str(config.get("topic", "")).encode()
        self._encoder = msgspec.msgpack.Encoder()
        self._context = zmq.Context()
        self._pub = self._context.socket(zmq.PUB)
        self._pub.bind(str(config["endpoint"]))
        self._replay = None
        if config.get("replay_endpoint"):
            self._replay = self._context.socket(zmq.ROUTER)
            self._replay.bind(str(config["replay_endpoint"]))
            threading.Thread(target=self._serve_replays, daemon=True).start()

    def admit(self, prompt: list[int]) -> int:
        """Look `prompt` up and store its blocks; the tokens it hit."""
        size = self.block_size
        with self._lock:
            events: list[Any] = []
            run: list[bytes] = []  # blocks stored in a row, told as one BlockStored
            tokens_of_run: list[int] = []
            parent, run_parent, hit_blocks, missed = NONE_HASH, NONE_HASH, 0, False
            for i in range(len(prompt) // size):
                tokens = prompt[i * size:(i + 1) * size]
                digest = block_hash(parent, tokens)
                if digest in self.held:  # reused: a hit while no block before it missed
                    hit_blocks += not missed
                    if run:
                        events.append(self._stored(run, run_parent, tokens_of_run))
                        run, tokens_of_run = [], []
                else:
                    missed = True
                    if not run:
                        run_parent = parent
                    run.append(digest)
                    tokens_of_run += tokens
                self.held[digest] = None
                self.held.move_to_end(digest)
                parent = digest
            if run:
                events.append(self._stored(run, run_parent, tokens_of_run))
            evicted = []
            while len(self.held) > self.capacity:
                evicted.append(self.held.popitem(last=False)[0])
            if evicted:
                events.append(BlockRemoved([external(d) for d in evicted], "GPU"))
            if events:
                self._publish(events)
            hit = min(hit_blocks, max(0, len(prompt) - 1) // size) * size  # the last token is always computed
            self.queries += len(prompt)
            self.hits += hit
            return hit

    def _stored(self, run: list[bytes], parent: bytes, tokens: list[int]) -> BlockStored:
        return BlockStored([external(d) for d in run], None if parent is NONE_HASH else external(parent), tokens,
                           self.block_size, None, "GPU", None)

    def close(self) -> None:
        """The engine's end: its sockets go (the replay thread closes its own as the context ends)."""
        with self._lock:
            self._pub.close(0)
        self._context.term()

    def clear(self) -> None:
        with self._lock:
            self.held.clear()
            self._publish([AllBlocksCleared()])

    @property
    def batches(self) -> int:
        """Batches numbered so far (sent or skipped)."""
        return self._seq

    def _publish(self, events: list[Any]) -> None:
        seq, self._seq = self._seq, self._seq + 1
        payload = self._encoder.encode(EventBatch(time.time(), events, 0))
        self._buffer.append((seq, payload))
        if seq not in self.skip:
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))

    def _serve_replays(self) -> None:
        assert self._replay is not None
        while True:
            try:
                client, _, start = self._replay.recv_multipart()
            except zmq.ZMQError:  # the context is ending
                self._replay.close(0)
                return
            with self._lock:
                batches = [(s, p) for s, p in self._buffer if s >= int.from_bytes(start, "big")]
            for seq, payload in batches:
                self._replay.send_multipart((client, b"", self._topic, seq.to_bytes(8, "big"), payload))
            self._replay.send_multipart((client, b"", b"", END_SEQ, b""))
