"""feed.py: a rank's events read in sequence from a real publisher (the stand-in's, standin_cache.py,
laid out as vLLM 0.32's), gaps repaired from its replay endpoint or the index dropped, a new engine
behind the same endpoint dropping the old one's blocks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import zmq.asyncio
from standin_cache import PrefixCache

from vllm_dp_supervisor.kvcache.blocks import block_keys
from vllm_dp_supervisor.kvcache.feed import Endpoints, FeedCounts, RankFeed

BS = 4


async def until(condition: Callable[[], bool], what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.01)


def config(tmp: Path, replay: bool = True) -> dict:
    return {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"ipc://{tmp}/events",
            "replay_endpoint": f"ipc://{tmp}/replay" if replay else None}


def held(feed: RankFeed, prompt: list[int]) -> int:
    return feed.index.run(block_keys(prompt, BS))


def run(scenario: Callable[..., object], tmp: Path, **publisher: object) -> None:
    async def main() -> None:
        cfg = config(tmp, publisher.pop("replay", True))  # type: ignore[arg-type]
        engine = PrefixCache(cfg, BS, 1000, **publisher)  # type: ignore[arg-type]
        context = zmq.asyncio.Context()
        feed = RankFeed(context, Endpoints(cfg["endpoint"], cfg["replay_endpoint"]), FeedCounts())
        feed.start()
        try:
            await scenario(engine, feed)
        finally:
            feed.close()
            await asyncio.sleep(0)
            engine.close()
            context.destroy(linger=0)
    asyncio.run(main())


A, B, C = list(range(100, 112)), list(range(200, 209)), list(range(300, 316))


def test_a_rank_s_stored_and_removed_blocks_are_indexed_in_sequence(tmp_path):
    async def scenario(engine, feed):
        await until(lambda: feed.trusted, "connected")
        engine.admit(A)
        engine.admit(B)
        await until(lambda: feed.counts.batches == 2, "two batches read")
        assert held(feed, A) == 3 and held(feed, B) == 2 and feed.counts.gaps == 0
        engine.capacity = 2  # the next admission evicts the oldest blocks
        engine.admit(A[:8])
        await until(lambda: feed.counts.batches == 3, "the removal read")
        assert len(feed.index) == len(engine.held) == 2
    run(scenario, tmp_path)


def test_a_batch_the_subscription_never_saw_is_asked_of_the_replay_endpoint(tmp_path):
    async def scenario(engine, feed):
        await until(lambda: feed.trusted, "connected")
        for prompt in (A, B, C):  # batch 1 (B) is numbered but never sent
            engine.admit(prompt)
        await until(lambda: feed.counts.batches == 3, "all three applied")
        assert feed.counts.gaps == 1 and feed.counts.repaired == 1 and not feed.counts.drops
        assert held(feed, B) == 2
    run(scenario, tmp_path, skip=frozenset({1}))


def test_a_subscriber_that_joins_late_replays_from_the_engine_s_first_batch(tmp_path):
    async def scenario(engine, feed):
        engine.admit(A)  # before the subscription is there: lost to it
        await until(lambda: feed.trusted, "connected")
        await asyncio.sleep(0.2)  # a slow joiner: let ZMQ finish the subscription
        engine.admit(B)
        await until(lambda: feed.counts.batches == 2, "the first batch replayed")
        assert held(feed, A) == 3 and held(feed, B) == 2
    run(scenario, tmp_path)


def test_a_gap_the_replay_cannot_fill_drops_the_index_and_rebuilds_from_what_comes(tmp_path):
    async def scenario(engine, feed):
        await until(lambda: feed.trusted, "connected")
        engine.admit(A)
        await until(lambda: feed.counts.batches == 1, "A read")
        engine.admit(B)  # numbered 1, never sent, and gone from the one-batch replay buffer by the next
        engine.admit(C)
        await until(lambda: feed.counts.batches == 2, "C read")
        assert feed.counts.drops == {"gap not repaired": 1}
        assert held(feed, A) == 0 and held(feed, B) == 0 and held(feed, C) == 4
    run(scenario, tmp_path, skip=frozenset({1}), buffer_steps=1)


def test_without_a_replay_endpoint_a_gap_drops_the_index(tmp_path):
    async def scenario(engine, feed):
        await until(lambda: feed.trusted, "connected")
        for prompt in (A, B, C):
            engine.admit(prompt)
        await until(lambda: feed.counts.batches == 2, "A and C read")
        assert feed.counts.drops == {"gap not repaired": 1} and held(feed, A) == 0 and held(feed, C) == 4
    run(scenario, tmp_path, skip=frozenset({1}), replay=False)


def test_a_new_engine_behind_the_endpoint_drops_what_the_old_one_held(tmp_path):
    async def scenario(engine, feed):
        await until(lambda: feed.trusted, "connected")
        engine.admit(A)
        engine.admit(B)
        await until(lambda: feed.counts.batches == 2, "the first engine's batches")
        engine.close()
        await until(lambda: not feed.trusted, "the subscription sees the engine go")
        second = PrefixCache(config(tmp_path), BS, 1000)
        try:
            await until(lambda: feed.trusted, "reconnected")
            await asyncio.sleep(0.2)
            second.admit(C)
            await until(lambda: feed.counts.batches == 3, "the new engine's first batch")
            assert feed.counts.drops == {"engine restarted": 1}
            assert held(feed, A) == 0 and held(feed, C) == 4
        finally:
            second.close()
    run(scenario, tmp_path)


def test_garbage_on_the_wire_is_counted_and_skipped(tmp_path):
    async def scenario(engine, feed):
        await until(lambda: feed.trusted, "connected")
        await asyncio.sleep(0.2)
        engine._pub.send_multipart([b"", b"\x00" * 8, b"\xc1not msgpack"])
        engine._pub.send_multipart([b"only two", b"frames"])
        engine.admit(A)
        await until(lambda: feed.counts.batches == 1, "the good batch read")
        assert feed.counts.unreadable == 2 and held(feed, A) == 3
    run(scenario, tmp_path)


def test_a_feed_that_joins_after_the_engine_published_catches_up_before_it_is_trusted(tmp_path):
    """A router worker replaced mid-run (or ZMQ's late joiner): what the engine holds is known the
    moment the rank is routed by its cache, not at its next batch."""
    async def main() -> None:
        cfg = config(tmp_path)
        engine = PrefixCache(cfg, BS, 1000)
        context = zmq.asyncio.Context()
        feed = RankFeed(context, Endpoints(cfg["endpoint"], cfg["replay_endpoint"]), FeedCounts())
        try:
            engine.admit(A)
            engine.admit(B)
            feed.start()
            await until(lambda: feed.trusted, "connected and caught up")
            assert held(feed, A) == 3 and held(feed, B) == 2 and feed.counts.batches == 2
            assert feed.counts.gaps == 0 and not feed.counts.drops
        finally:
            feed.close()
            await asyncio.sleep(0)
            engine.close()
            context.destroy(linger=0)
    asyncio.run(main())
