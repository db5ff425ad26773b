"""bench-prefix's saturated row: vLLM's own client (`vllm bench serve`, dataset `prefix_repetition`)
through the router over two real CPU ranks, at a request rate they cannot keep up with, once
per policy from a fresh pod. The prefixes together exceed one rank's KV cache and fit in both,
so the engines evict while the load lasts: a router that keeps each prefix on one rank hits,
one that places by load rebuilds. Judged by vLLM's own counters (prefix-cache hits over
queries, summed over ranks) and the client's TTFT. Goals (issue 34): cache cuts
least-requests' misses at least in half and its TTFT p50 to at most 0.7x. The ranks run with
--enable-prompt-tokens-details, so each answer says what its rank hit, which the router sets
beside what it credited (its per-request error: over- and under-credited tokens).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from prefix_bench import PY, SERVED, Pod, cache_ready, counters, router_series

PREFIXES, PREFIX_LEN, SUFFIX_LEN, OUTPUT_LEN = 16, 512, 64, 8  # 16 x 512 tokens: over one cache, under two
PROMPTS, RATE = 192, 4.0


def run(model: str, policy: str, tmp: Path) -> dict:
    pod = Pod(model, policy, tmp / f"saturated-{policy}.log", server_extra=("--enable-prompt-tokens-details",))
    try:
        if policy == "cache":
            cache_ready(pod)
        h0, q0 = counters(pod.ports)
        out = tmp / f"saturated-{policy}.json"
        cmd = [str(Path(PY).parent / "vllm"), "bench", "serve", "--backend", "openai", "--base-url",
               f"http://127.0.0.1:{pod.router}", "--model", SERVED, "--tokenizer", model,
               "--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(PREFIX_LEN),
               "--prefix-repetition-suffix-len", str(SUFFIX_LEN), "--prefix-repetition-num-prefixes", str(PREFIXES),
               "--prefix-repetition-output-len", str(OUTPUT_LEN), "--num-prompts", str(PROMPTS),
               "--request-rate", str(RATE), "--seed", "0", "--save-result", "--result-dir", str(tmp),
               "--result-filename", out.name]
        with open(tmp / f"saturated-{policy}.client.log", "wb") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, timeout=1800,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
        time.sleep(1.5)  # the workers' counters reach the supervisor twice a second
        h1, q1 = counters(pod.ports)
        recalled = router_series(pod.sup, "supervisor_router_cache_recalled_total")
        error = {name: router_series(pod.sup, f"supervisor_router_cache_{name}_total") for name in
                 ("checked", "over_credited", "over_credited_tokens", "under_credited_tokens")}
    finally:
        pod.close()
    result = json.loads(out.read_text())
    return {"policy": policy, "hit_rate": (h1 - h0) / max(q1 - q0, 1), "queries": q1 - q0,
            "ttft_p50": result["median_ttft_ms"], "ttft_p99": result["p99_ttft_ms"],
            "completed": result["completed"], "throughput": result["request_throughput"], "recalled": recalled,
            **error}


def rows(model: str, tmp: Path) -> list[str]:
    results = {policy: run(model, policy, tmp) for policy in ("least-requests", "cache")}
    lines = ["## Saturated: `vllm bench serve --dataset-name prefix_repetition`, two real CPU ranks", "",
             f"{PREFIXES} prefixes of {PREFIX_LEN} tokens (together over one rank's KV cache, under both), suffixes "
             f"of {SUFFIX_LEN}, {OUTPUT_LEN} tokens out, {PROMPTS} requests at {RATE:g}/s (more than two CPU ranks "
             "serve); a fresh pod per policy; hit rate from vLLM's own counters.", "",
             "| policy | prefix-cache hit rate | misses (1 - hit rate) | TTFT p50 | TTFT p99 | completed | requests/s "
             "| placed by memory |", "|---|---|---|---|---|---|---|---|"]
    for policy, r in results.items():
        lines.append(f"| {policy} | {r['hit_rate']:.1%} | {1 - r['hit_rate']:.1%} | {r['ttft_p50'] / 1000:.1f} s | "
                     f"{r['ttft_p99'] / 1000:.1f} s | {r['completed']} | {r['throughput']:.2f} | "
                     f"{int(r['recalled']) if policy == 'cache' else '-'} |")
    lr, c = results["least-requests"], results["cache"]
    misses = (1 - c["hit_rate"]) / max(1 - lr["hit_rate"], 1e-9)
    ttft = c["ttft_p50"] / max(lr["ttft_p50"], 1e-9)
    lines += ["", f"- cache's misses x{misses:.2f} least-requests' (goal: at most x0.5): "
                  f"{'met' if misses <= 0.5 else 'NOT met'}; its TTFT p50 x{ttft:.2f} (goal: at most x0.7): "
                  f"{'met' if ttft <= 0.7 else 'NOT met'}",
              f"- cache's per-request error (each answer's `cached_tokens` against the tokens credited to its "
              f"rank): {int(c['checked'])} requests checked; {int(c['over_credited'])} over-credited "
              f"({int(c['over_credited_tokens'])} tokens credited that the engine did not hit: blocks evicted "
              f"between the placement and the engine's scheduling, or events not in yet), "
              f"{int(c['under_credited_tokens'])} tokens hit that were not credited", ""]
    return lines
