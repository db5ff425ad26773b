"""`make bench-prefix`: the prefix policy against least-requests, with real vLLM (CPU build) on
this machine. Two ranks of the demo model (SmolLM2-135M, float32) with 256 MiB of KV cache each;
chat requests that share long system prompts: several distinct prompts, several questions each.

The workload is built so that the two policies can differ: the distinct system prompts together
exceed one rank's KV cache but fit in both ranks' caches. The same requests, in the same order,
go through the router under each policy, from a fresh pod each time (empty caches). Measured:
vLLM's own prefix-cache hit rate (sum over ranks of `vllm:prefix_cache_hits_total` over
`vllm:prefix_cache_queries_total`, the increase during the run) and the time to first token of
streamed answers (the first SSE event), p50 and p90. Goal: prefix at least doubles the hit rate
and halves the p50 time to first token. Writes bench/results/prefix.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
KV_BYTES = 256 << 20
SERVED = "smollm2"
WORDS = [
    "harbor", "ledger", "copper", "mountain", "violet", "engine", "quiet", "river", "lantern", "orchard",
    "falcon", "marble", "canyon", "thunder", "velvet", "compass", "meadow", "glacier", "saddle", "beacon",
    "timber", "crystal", "willow", "anchor", "prairie", "summit", "cobalt", "ember", "fabric", "garnet",
    "horizon", "island", "jasmine", "kettle", "lagoon", "nectar", "oyster", "pepper", "quarry", "raven",
    "scarlet", "tundra", "umber", "valley", "walnut", "yonder", "zephyr",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def system_prompts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"You are archivist {i}. Answer from this register only. " +
            " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(n)]


def get_json(port: int, path: str, timeout: float = 5) -> tuple[int, dict | str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read().decode()
        try:
            return r.status, json.loads(body)
        except ValueError:
            return r.status, body
    except OSError:
        return 0, ""
    finally:
        conn.close()


def counters(ports: list[int]) -> tuple[float, float]:
    """(hits, queries) summed over ranks."""
    hits = queries = 0.0
    for port in ports:
        _, text = get_json(port, "/metrics")
        for line in str(text).splitlines():
            if line.startswith("vllm:prefix_cache_hits_total"):
                hits += float(line.rsplit(" ", 1)[1])
            elif line.startswith("vllm:prefix_cache_queries_total"):
                queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


def tokens(port: int, text: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/tokenize", body=json.dumps({"model": SERVED, "prompt": text}),
                 headers={"Content-Type": "application/json"})
    return int(json.loads(conn.getresponse().read())["count"])


def ask(router: int, system: str, question: str) -> tuple[float, float, str]:
    """(time to first token, total, rank) of one streamed chat answer."""
    body = json.dumps({"model": SERVED, "stream": True, "max_tokens": 4, "temperature": 0, "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": question}]})
    conn = http.client.HTTPConnection("127.0.0.1", router, timeout=300)
    t0 = time.monotonic()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    first = None
    while line := r.fp.readline():
        if line.startswith(b"data: ") and first is None and b'"content"' in line:
            first = time.monotonic() - t0
        if line.strip() == b"data: [DONE]":
            break
    conn.close()
    return (first if first is not None else time.monotonic() - t0), time.monotonic() - t0, r.getheader("x-dp-rank", "?")


class Pod:
    def __init__(self, model: str, policy: str, log: Path) -> None:
        self.sup, self.router = free_port(), free_port()
        base = free_port()
        self.ports = [base, base + 1]
        self.log = open(log, "wb")  # noqa: SIM115
        cmd = [PY, "-m", "vllm_dp_supervisor", "--dp-size-local", "2", "--port", str(base),
               "--supervisor-port", str(self.sup), "--router-port", str(self.router), "--host", "127.0.0.1",
               "--router-policy", policy, "--deep-probe-interval", "0", "--startup-timeout", "600",
               "--", model, "--served-model-name", SERVED, "--dtype", "float32", "--max-model-len", "1024",
               "--kv-cache-memory-bytes", str(KV_BYTES), "--enforce-eager"]
        env = {**os.environ, "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 600
        while get_json(self.sup, "/ready")[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the pod did not get ready; see {log}")
            time.sleep(0.5)

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log.close()
        return code


def kv_cache_tokens(log: Path) -> int:
    """What vLLM says its KV cache holds ("KV cache size: 5,760 tokens")."""
    for line in log.read_text(errors="replace").splitlines():
        if "KV cache size:" in line:
            return int(line.split("KV cache size:")[1].split("tokens")[0].replace(",", "").strip())
    return 0


def percentile(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def run_policy(model: str, policy: str, work: list[tuple[str, str]], clients: int, tmp: Path) -> dict:
    pod = Pod(model, policy, tmp / f"{policy}.log")
    try:
        for port in pod.ports:  # one short request each: the first request's own start-up is not measured
            ask_direct = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            ask_direct.request("POST", "/v1/completions", body=json.dumps(
                {"model": SERVED, "prompt": "Hello", "max_tokens": 1}), headers={"Content-Type": "application/json"})
            ask_direct.getresponse().read()
        prompt_tokens = tokens(pod.ports[0], work[0][0])
        h0, q0 = counters(pod.ports)
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda w: ask(pod.router, *w), work))
        took = time.monotonic() - t0
        h1, q1 = counters(pod.ports)
    finally:
        code = pod.close()
    ttft = [r[0] for r in results]
    return {"policy": policy, "requests": len(results), "hit_rate": (h1 - h0) / max(q1 - q0, 1),
            "ttft_p50": percentile(ttft, 0.5), "ttft_p90": percentile(ttft, 0.9), "seconds": took,
            "by_rank": {r: sum(1 for x in results if x[2] == r) for r in sorted({x[2] for x in results})},
            "prompt_tokens": prompt_tokens, "exit": code}


def workload(prompts: list[str], questions: int, seed: int) -> list[tuple[str, str]]:
    """Every prompt once per round, each round in a new order, `questions` rounds."""
    rng = random.Random(seed)
    work = []
    for q in range(questions):
        order = list(prompts)
        rng.shuffle(order)
        work += [(p, f"Question {q}: which word comes first in the register?") for p in order]
    return work


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=14, help="distinct system prompts")
    parser.add_argument("--words", type=int, default=475, help="words of each system prompt")
    parser.add_argument("--questions", default="5,10", help="questions per system prompt: one workload each")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "prefix.md"))
    args = parser.parse_args()
    model = subprocess.run([PY, str(ROOT / "demo" / "build_model.py"), "smollm2"], check=True,
                           stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
    prompts = system_prompts(args.prompts, args.words, args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    table = ["| questions per prompt | policy | prefix-cache hit rate | TTFT p50 | TTFT p90 | run time | "
             "requests by rank |", "|---|---|---|---|---|---|---|"]
    goals, tokens_each, kv_tokens = [], 0, 0
    for questions in (int(q) for q in args.questions.split(",")):
        work = workload(prompts, questions, args.seed)
        lr, px = (run_policy(model, policy, work, args.clients, tmp) for policy in ("least-requests", "prefix"))
        tokens_each, kv_tokens = lr["prompt_tokens"], kv_cache_tokens(tmp / "prefix.log")
        for r in (lr, px):
            table.append(f"| {questions} ({len(work)} requests) | {r['policy']} | {r['hit_rate']:.1%} | "
                         f"{r['ttft_p50'] * 1000:.0f} ms | {r['ttft_p90'] * 1000:.0f} ms | {r['seconds']:.0f} s | "
                         f"{', '.join(f'{k}: {v}' for k, v in r['by_rank'].items())} |")
        hits = px["hit_rate"] / max(lr["hit_rate"], 1e-9)
        ttft = px["ttft_p50"] / lr["ttft_p50"]
        goals += [f"- {questions} questions per prompt: hit rate x{hits:.1f} (goal: at least x2): "
                  f"{'met' if hits >= 2 else 'NOT met'}; TTFT p50 x{ttft:.2f} (goal: at most x0.5): "
                  f"{'met' if ttft <= 0.5 else 'NOT met'}"]
    lines = ["## Prefix-aware routing, real vLLM (CPU), two ranks", "",
             f"{args.prompts} system prompts of ~{tokens_each} tokens; each round asks every prompt one question "
             f"(a streamed chat, max_tokens 4, {args.clients} clients), every round in a new order. KV cache "
             f"{KV_BYTES >> 20} MiB per rank ({kv_tokens:,} tokens, as vLLM logs it): the prompts together "
             f"(~{args.prompts * tokens_each:,} tokens) exceed one rank's cache and fit in both. A fresh pod "
             f"(empty caches) for each row.", "", *table, "", *goals, ""]
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text)
    print(f"logs: {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
