"""routing.py: what a worker knows of the caches over two real publishers (the stand-in's), the
tokenizer loaded from files, an index dropped with its engine's attempt, and every request it
cannot place by cache placed by load, with the reason counted."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import standin_model
import standin_tokenizer
from standin_cache import PrefixCache

from vllm_dp_supervisor.kvcache import CacheRouting, Endpoints
from vllm_dp_supervisor.router.policies.cache import choose
from vllm_dp_supervisor.router.policies.load import Load
from vllm_dp_supervisor.router.routes import body_json
from vllm_dp_supervisor.settings.config import ModelSource

BS = 4
CHAT = "/v1/chat/completions"


async def until(condition: Callable[[], bool], what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.01)


def chat(system: str, question: str) -> bytes:
    return json.dumps({"messages": [{"role": "system", "content": system},
                                    {"role": "user", "content": question}]}).encode()


def place(cache: CacheRouting, path: str, body: bytes, candidates: list[int], inflight: dict[int, int]) -> int | None:
    """Where the cache policy (router/policies/cache.py) sends it by what `cache` says the ranks
    hold; None: the cache cannot read it (placed by load)."""
    holdings = cache.holdings(path, body_json(body), candidates)
    if holdings is None:
        return None
    load = Load(1.25, lambda: 0.0)
    load.inflight.update(inflight)
    rank = choose(candidates, holdings, load, 2.0)
    cache.placed(rank, holdings)
    return rank


def prompt_of(body: bytes) -> list[int]:
    return standin_model.chat_prompt(json.loads(body)["messages"])


def run(scenario, tmp_path, model=True, names: tuple[str, ...] = ()) -> None:
    directory = standin_tokenizer.build(tmp_path / "model")

    async def main() -> None:
        configs = {r: {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"ipc://{tmp_path}/e{r}",
                       "replay_endpoint": f"ipc://{tmp_path}/r{r}"} for r in (0, 1)}
        engines = {r: PrefixCache(c, BS, 1000) for r, c in configs.items()}
        cache = CacheRouting({r: Endpoints(c["endpoint"], c["replay_endpoint"]) for r, c in configs.items()},
                             ModelSource(str(directory), names=names) if model else None, {})
        try:
            cache.follow({0: (1, True), 1: (1, True)})
            await scenario(cache, engines)
        finally:
            cache.close()
            for engine in engines.values():
                engine.close()
    asyncio.run(main())


def test_a_prompt_goes_to_the_rank_holding_its_prefix_and_the_predicted_hit_is_the_engine_s(tmp_path):
    async def scenario(cache, engines):
        await until(lambda: cache.reader is not None and all(f.trusted for _, f in cache.feeds.values()), "ready")
        first, second = chat("You are a pirate. " * 4, "hello?"), chat("You are a pirate. " * 4, "bye!")
        engines[1].admit(prompt_of(first))  # rank 1 answered the first: its blocks are there
        await until(lambda: cache.counts[1].batches == 1, "rank 1's store read")
        rank = place(cache, CHAT, second, [0, 1], {0: 0, 1: 0})
        assert rank == 1
        hit = engines[1].admit(prompt_of(second))
        assert hit > 0 and cache.predicted_hits[1] == hit
    run(scenario, tmp_path)


def test_a_rank_s_new_attempt_starts_from_an_empty_index(tmp_path):
    async def scenario(cache, engines):
        await until(lambda: cache.reader is not None and all(f.trusted for _, f in cache.feeds.values()), "ready")
        body = chat("Long shared system prompt. " * 4, "q")
        engines[0].admit(prompt_of(body))
        await until(lambda: cache.counts[0].batches == 1, "rank 0's store read")
        assert place(cache, CHAT, body, [0, 1], {}) == 0
        endpoints = cache.feeds[0][1].endpoints
        engines[0].close()  # rank 0 restarted: a new engine, nothing cached
        cache.follow({0: (2, True), 1: (1, True)})
        assert cache.counts[0].drops == {"engine ended": 1}
        engines[0] = PrefixCache({"endpoint": endpoints.events, "replay_endpoint": endpoints.replay}, BS, 1000)
        await until(lambda: cache.feeds[0][1].trusted, "the new attempt's feed connected")
        before = cache.predicted_hits[0]
        place(cache, CHAT, body, [0, 1], {})
        assert cache.predicted_hits[0] == before  # whatever it picked, it predicted no hit on rank 0
        cache.follow({0: (2, False), 1: (1, True)})  # stopping: its feed goes
        assert 0 not in cache.feeds
    run(scenario, tmp_path)


def test_what_it_cannot_place_by_cache_goes_by_load_with_the_reason_counted(tmp_path):
    async def scenario(cache, engines):
        assert place(cache, CHAT, chat("s", "q"), [0, 1], {}) is None  # the tokenizer is loading
        await until(lambda: cache.reader is not None and all(f.trusted for _, f in cache.feeds.values()), "ready")
        assert place(cache, "/v1/embeddings", b"{}", [0, 1], {}) is None
        assert place(cache, CHAT, b"not json", [0, 1], {}) is None
        assert place(cache, CHAT, json.dumps({"messages": [{"role": "user", "content": "x"}],
                                             "cache_salt": "t"}).encode(), [0, 1], {}) is None
        engines[1].close()
        await until(lambda: not cache.feeds[1][1].trusted, "rank 1's events stop")
        assert place(cache, CHAT, chat("s", "q"), [0, 1], {}) is None
        assert place(cache, CHAT, chat("s", "q"), [0], {}) == 0  # rank 0's are still read
        assert cache.fallbacks == {"no tokenizer": 1, "not a completion": 1, "prompt not read": 2,
                                   "events not read": 1}
        engines[1] = PrefixCache({"endpoint": cache.feeds[1][1].endpoints.events}, BS, 1000)
        await until(lambda: cache.feeds[1][1].trusted, "rank 1's events resume")
        report = cache.report()
        assert report["tokenizer"] == 1 and report["ranks"]["1"]["trusted"] == 1
    run(scenario, tmp_path)


def test_without_the_model_s_files_every_request_goes_by_load(tmp_path):
    async def scenario(cache, engines):
        await until(lambda: cache._said is not None, "the reason logged")
        assert cache.reader is None and place(cache, CHAT, chat("s", "q"), [0, 1], {}) is None
    run(scenario, tmp_path, model=False)


def test_a_prefix_its_engine_evicted_goes_back_where_it_went_not_by_load(tmp_path):
    """Under saturation: the index rightly says the prefix is held nowhere, and the worker's own
    placements keep it on one rank, where it is rebuilt once."""
    async def scenario(cache, engines):
        await until(lambda: cache.reader is not None and all(f.trusted for _, f in cache.feeds.values()), "ready")
        system = "You are a careful archivist of long registers. " * 3
        first = chat(system, "first?")
        engines[0].admit(prompt_of(chat("warm", "up")))  # a store: the index learns the block size
        await until(lambda: cache.counts[0].batches == 1, "rank 0's first store read")
        assert place(cache, CHAT, first, [0, 1], {0: 0, 1: 1}) == 0  # by load: nothing held
        engines[0].admit(prompt_of(first))
        await until(lambda: cache.counts[0].batches == 2, "rank 0's store read")
        engines[0].clear()  # evicted (vLLM's AllBlocksCleared): held nowhere now
        await until(lambda: len(cache.feeds[0][1].index) == 0, "rank 0's eviction read")
        again = chat(system, "second?")
        holdings = cache.holdings(CHAT, body_json(again), [0, 1])
        assert holdings is not None and holdings.held == {0: 0, 1: 0} and holdings.recalled is not None
        assert place(cache, CHAT, again, [0, 1], {0: 1, 1: 0}) == 0  # one more in flight there: still rank 0
        assert cache.recalled == {0: 1}
        assert place(cache, CHAT, chat("Nothing like it was seen before. " * 3, "?"), [0, 1], {0: 1, 1: 0}) == 1
    run(scenario, tmp_path)


def test_a_lora_adapter_s_request_goes_by_load_never_by_the_base_model_s_blocks(tmp_path):
    """vLLM keys a LoRA request's blocks by the adapter too: the base model's blocks never hit."""
    async def scenario(cache, engines):
        await until(lambda: cache.reader is not None and all(f.trusted for _, f in cache.feeds.values()), "ready")
        body = chat("You are a pirate. " * 4, "hello?")
        engines[1].admit(prompt_of(body))
        await until(lambda: cache.counts[1].batches == 1, "rank 1's store read")
        as_lora = json.dumps({**json.loads(body), "model": "pirate-lora"}).encode()
        assert place(cache, CHAT, as_lora, [0, 1], {}) is None
        assert cache.fallbacks == {"not the base model": 1}
        for name in ("base", "base-alias", None, ""):  # the served names, or none (vLLM's default model)
            named = json.dumps({**json.loads(body), **({"model": name} if name is not None else {})}).encode()
            assert place(cache, CHAT, named, [0, 1], {}) == 1
    run(scenario, tmp_path, names=("base", "base-alias"))


def test_a_prefix_goes_back_where_it_went_before_any_engine_said_its_block_size(tmp_path):
    """Under saturation the first events come tens of seconds after the first placements."""
    async def scenario(cache, engines):
        await until(lambda: cache.reader is not None and all(f.trusted for _, f in cache.feeds.values()), "ready")
        system = "You are a careful archivist of long registers. " * 3
        assert place(cache, CHAT, chat(system, "first?"), [0, 1], {0: 1, 1: 0}) == 1  # by load
        assert place(cache, CHAT, chat(system, "second?"), [0, 1], {0: 0, 1: 1}) == 1  # remembered
        assert place(cache, CHAT, chat("Nothing like it. " * 9, "?"), [0, 1], {0: 0, 1: 1}) == 0
        assert cache.recalled == {1: 1} and all(i.block_size is None for _, f in cache.feeds.values()
                                                for i in [f.index])
    run(scenario, tmp_path)


def test_a_long_prompt_of_token_ids_is_credited_to_the_rank_holding_it(tmp_path):
    """An RL rollout's prompt: token ids, longer than the memory reads (it once estimated 0 tokens)."""
    async def scenario(cache, engines):
        await until(lambda: cache.reader is not None and all(f.trusted for _, f in cache.feeds.values()), "ready")
        ids = [(7 * i) % 250 for i in range(3001)]
        engines[1].admit(ids)
        await until(lambda: cache.counts[1].batches == 1, "rank 1's store read")
        body = json.dumps({"prompt": ids, "max_tokens": 1}).encode()
        holdings = cache.holdings("/v1/completions", body_json(body), [0, 1])
        assert holdings is not None and holdings.tokens == 3001 and holdings.held[1] == 3000 // BS
        assert place(cache, "/v1/completions", body, [0, 1], {0: 0, 1: 1}) == 1
        assert cache.predicted_hits[1] == 3000
    run(scenario, tmp_path)


SKIP_SHAPES = [{}, {"prompt_logprobs": 0}, {"prompt_logprobs": 2}, {"prompt_logprobs": None}, {"echo": True},
               {"echo": True, "logprobs": True, "top_logprobs": 2}, {"echo": True, "top_logprobs": None},
               {"echo": True, "logprobs": 3}, {"echo": False, "logprobs": 3}, {"logprobs": True, "top_logprobs": 5}]


def test_the_requests_vllm_reads_no_prefix_cache_for_are_those_it_says():
    """_skips_cache against vLLM's own request classes: SamplingParams.skip_reading_prefix_cache."""
    import pytest
    chat_protocol = pytest.importorskip("vllm.entrypoints.openai.chat_completion.protocol")
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from vllm_dp_supervisor.kvcache.routing import _skips_cache
    for shape in SKIP_SHAPES:
        for path in (CHAT, "/v1/completions"):
            if path == CHAT:
                if isinstance(shape.get("logprobs"), int) and not isinstance(shape.get("logprobs"), bool):
                    continue  # a completion's shape
                asked = chat_protocol.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                                            **shape)
            else:
                if isinstance(shape.get("logprobs"), bool) or "top_logprobs" in shape:
                    continue  # a chat's shape
                asked = CompletionRequest(model="m", prompt="hi", **shape)
            vllm_says = asked.to_sampling_params(16, {}).skip_reading_prefix_cache
            assert _skips_cache(path, shape) == vllm_says, (path, shape)


def test_what_a_rank_hit_is_counted_against_the_prediction():
    cache = CacheRouting({}, None, {})
    try:
        for rank, predicted, hit in [(0, 256, 256), (0, 256, 128), (1, 0, 128), (1, 128, 128)]:
            cache.checked(rank, predicted, hit)
        assert {name: dict(counts) for name, counts in cache.checks.items()} == {
            "checked": {0: 2, 1: 2}, "over_credited": {0: 1}, "over_credited_tokens": {0: 128},
            "under_credited_tokens": {0: 0, 1: 128}}
    finally:
        cache.close()
