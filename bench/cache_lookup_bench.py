"""The cache policy's own cost on one request, in-process: the prompt read as far as a rank holds
it (template, tokenizer, block keys) and the choice, with the demo model's real tokenizer
(SmolLM2-135M) and 128-token blocks (vLLM's CPU block size). `make bench-prefix` prints it.

Cases, each a ~2,000-token chat: `shared prefix`: a conversation whose first 1,800 tokens a rank
holds and whose pieces the router has tokenized before (a system prompt, earlier turns: the
common case the policy is for); `nothing held`: a prompt no rank holds, never seen (read up to
its first block); `all held, first sight`: a prompt a rank holds whole but this router never
tokenized (after a worker restart). Goal: p50 under 1 ms for the first. Then prompts of ~500k
characters never seen, held by no rank (the worker's event loop, every stream on it, waits this
long): Chinese with no space and no mark, Chinese with commas, minified JSON. Goal: under 10 ms.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vllm_dp_supervisor.kvcache import model_files  # noqa: E402
from vllm_dp_supervisor.kvcache.blocks import PromptBlocks, block_keys  # noqa: E402
from vllm_dp_supervisor.kvcache.holdings import Holdings, held_runs  # noqa: E402
from vllm_dp_supervisor.kvcache.index import BlockIndex  # noqa: E402
from vllm_dp_supervisor.kvcache.placements import MEMORY_BLOCK, depths  # noqa: E402
from vllm_dp_supervisor.kvcache.prompts import PromptReader  # noqa: E402
from vllm_dp_supervisor.router.policies.cache import choose  # noqa: E402
from vllm_dp_supervisor.router.policies.load import Load  # noqa: E402
from vllm_dp_supervisor.router.routes import body_json  # noqa: E402
from vllm_dp_supervisor.settings.config import ModelSource  # noqa: E402

BS = 128
WORDS = ["ledger", "harbor", "copper", "mountain", "violet", "engine", "quiet", "river", "lantern", "orchard",
         "falcon", "marble", "canyon", "thunder", "velvet", "compass", "meadow", "glacier", "saddle", "beacon"]


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def lookup(reader: PromptReader, body: bytes, indexes: dict[int, BlockIndex]) -> tuple[float, int]:
    """Seconds for one placement, as the cache policy makes it (router/policies/cache.py over
    kvcache.CacheRouting.holdings); and the blocks held."""
    started = time.perf_counter()
    prompt = reader.text("/v1/chat/completions", body_json(body) or {})
    memory = PromptBlocks((ids for ids, _ in reader.token_pieces(prompt)), MEMORY_BLOCK)
    for depth in depths():  # the keys the worker remembers placements by, as kvcache/routing.py reads them
        memory.key(depth // MEMORY_BLOCK - 1)
    reading = PromptBlocks((ids for ids, _ in reader.token_pieces(prompt)), BS)
    held = held_runs(reading, indexes)
    load = Load(1.25)
    load.inflight[0] = 1
    choose(list(indexes), Holdings(held, max(1.0, reading.tokens / BS), {0: len(indexes[0]), 1: 0}, BS), load, 2.0)
    return time.perf_counter() - started, max(held.values())


def chat(system: str, question: str) -> bytes:
    return json.dumps({"messages": [{"role": "system", "content": system},
                                    {"role": "user", "content": question}]}).encode()


def run(model: str, trials: int = 200) -> list[tuple[str, float, float, int, int]]:
    """(case, p50 s, p99 s, prompt tokens, blocks held) per case."""
    reader = PromptReader(model_files.find(ModelSource(model), os.environ))
    rng = random.Random(5)
    rows = []
    for case in ("shared prefix", "nothing held", "all held, first sight"):
        samples, held, tokens = [], 0, 0
        system = text(rng, 1860)  # ~1,900 tokens, with the question ~2,000
        for i in range(trials):
            if case != "shared prefix":
                system = text(rng, 1860)
            body = chat(system, f"Question {i}: " + text(rng, 120))
            ids = reader.token_ids(reader.text("/v1/chat/completions", body_json(body) or {}))
            tokens = len(ids)
            index = BlockIndex()
            keys = list(block_keys(ids, BS))
            stored = keys[:len(keys) - 2] if case == "shared prefix" else keys if case.startswith("all held") else []
            parent = None
            for n, _ in enumerate(stored):  # the index as the engine's events would make it
                index.stored([n + 1], parent, ids[n * BS:(n + 1) * BS], BS)
                parent = n + 1
            if case == "all held, first sight":
                reader._pieces.clear()  # a router that never tokenized it
            elif case == "shared prefix" and i == 0:
                lookup(reader, body, {0: index, 1: BlockIndex()})  # its pieces seen once before
            took, held = lookup(reader, body, {0: index, 1: BlockIndex()})
            samples.append(took)
        samples.sort()
        rows.append((case, statistics.median(samples), samples[int(0.99 * (len(samples) - 1))], tokens, held))
    return rows


def long_prompts(model: str, trials: int = 10) -> list[tuple[str, float, float, int]]:
    """(case, worst seconds of the policy's own work, worst seconds parsing the body, characters)
    for ~500k-character prompts no rank holds, never seen. The body's JSON is parsed for any
    policy (the router reads every completion's body); the rest is the cache policy's."""
    reader = PromptReader(model_files.find(ModelSource(model), os.environ))
    rng = random.Random(6)
    han = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    cases = {
        "Chinese, no space or mark": lambda: "".join(rng.choices(han, k=500_000)),
        "Chinese with commas": lambda: "".join(c + ("，" if rng.random() < 0.05 else "")
                                               for c in rng.choices(han, k=480_000)),
        "minified JSON": lambda: json.dumps([{"id": rng.randrange(10**6), "name": text(rng, 2), "v": rng.random()}
                                             for _ in range(9000)], separators=(",", ":")),
    }
    rows = []
    for case, make in cases.items():
        worst = worst_parse = 0.0
        chars = 0
        for _ in range(trials):
            prompt = make()
            chars = len(prompt)
            body = json.dumps({"messages": [{"role": "user", "content": prompt}]}).encode()
            took = lookup(reader, body, {0: BlockIndex(), 1: BlockIndex()})[0]  # its body parsed within
            started = time.perf_counter()
            body_json(body)
            parse = time.perf_counter() - started
            worst, worst_parse = max(worst, took - parse), max(worst_parse, parse)
        rows.append((case, worst, worst_parse, chars))
    return rows


def table(model: str) -> list[str]:
    rows = run(model)
    long = long_prompts(model)
    lines = ["| the policy's work on one ~2,000-token chat | p50 | p99 | prompt tokens | blocks held |",
             "|---|---|---|---|---|"]
    lines += [f"| {case} | {p50 * 1000:.2f} ms | {p99 * 1000:.2f} ms | {tokens} | {held} |"
              for case, p50, p99, tokens, held in rows]
    p50 = rows[0][1]
    lines += ["", f"- added latency, shared prefix, p50 {p50 * 1000:.2f} ms (goal: under 1 ms): "
              f"{'met' if p50 < 0.001 else 'NOT met'}", "",
              "| a long prompt no rank holds, never seen | characters | the cache policy's work, worst of 10 | "
              "its body's JSON parsed, worst (every policy parses a streamed request's) |", "|---|---|---|---|"]
    lines += [f"| {case} | {chars:,} | {worst * 1000:.2f} ms | {parse * 1000:.2f} ms |"
              for case, worst, parse, chars in long]
    worst = max(w for _, w, _, _ in long)
    lines += ["", f"- the cache policy delays the worker's other streams at most {worst * 1000:.2f} ms on a long "
              f"prompt (goal: under 10 ms): {'met' if worst < 0.010 else 'NOT met'}"]
    return lines


if __name__ == "__main__":
    print("\n".join(table(sys.argv[1])))
