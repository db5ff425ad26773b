"""`make bench-prefix`: the cache and prefix policies against least-requests, with real vLLM (CPU
build) on this machine. Two ranks of the demo model (SmolLM2-135M, float32) with 256 MiB of KV
cache each (5,760 tokens, 45 blocks of 128); streamed chats, 2 clients. Three workloads, each run
under each policy from a fresh pod (empty caches), the same requests in the same order:

- `shared`: 14 system prompts of ~574 tokens, 10 rounds, each round every prompt once in a new
  order: the prompts together exceed one rank's cache and fit in both.
- `many`: 60 system prompts drawn by popularity (Zipf, s = 1.1), 140 requests: many more
  distinct prefixes than both caches hold.
- `unique`: 140 requests that share nothing: the cache policy must cost nothing here.

Measured: vLLM's own prefix-cache hit rate (the increase of `vllm:prefix_cache_hits_total` over
`vllm:prefix_cache_queries_total`, summed over ranks), the best any routing could reach on the
workload (every repeat hits all the full blocks it shares with its prompt's last request), the
time to first token (the first SSE content event) p50 and p90, throughput, the requests each rank
took, under the cache policy the hits its router predicted, and the router worker's CPU per 1,000
requests. Goals: on `shared`, cache's hit rate at least 2x least-requests' and its p50 at most
half; on `unique`, its throughput and p50 within 5% of least-requests'. Writes
bench/results/prefix.md, with the policy's own cost per request (cache_lookup_bench.py).
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

import cache_lookup_bench
import psutil

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
    def __init__(self, model: str, policy: str, log: Path, extra: tuple[str, ...] = (),
                 server_extra: tuple[str, ...] = ()) -> None:
        """`extra`: more of the supervisor's options; `server_extra`: more of vLLM's."""
        self.sup, self.router = free_port(), free_port()
        base = free_port()
        self.ports = [base, base + 1]
        self.log = open(log, "wb")  # noqa: SIM115
        cmd = [PY, "-m", "vllm_dp_supervisor", "--dp-size-local", "2", "--min-ready-ranks", "2", "--port", str(base),
               "--supervisor-port", str(self.sup), "--router-port", str(self.router), "--host", "127.0.0.1",
               "--router-policy", policy, "--deep-probe-interval", "0", "--startup-timeout", "600", *extra,
               "--", model, "--served-model-name", SERVED, "--dtype", "float32", "--max-model-len", "1024",
               "--kv-cache-memory-bytes", str(KV_BYTES), "--enforce-eager", *server_extra]
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


def router_cpu(sup: int) -> float:
    """CPU seconds the router's workers have used so far."""
    status = get_json(sup, "/status", 30)[1]
    pids = [w["pid"] for w in status["router"]["workers"]] if isinstance(status, dict) else []  # type: ignore[index]
    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


def router_series(sup: int, name: str) -> float:
    """A router series on the supervisor's /metrics, summed over its labels."""
    _, text = get_json(sup, "/metrics", 30)
    return sum(float(line.rsplit(" ", 1)[1]) for line in str(text).splitlines() if line.startswith(name))


def cache_ready(pod: Pod) -> None:
    """Until the cache policy has the tokenizer and both ranks' events: before the clock starts."""
    deadline = time.monotonic() + 120
    while router_series(pod.sup, "supervisor_router_cache_tokenizer_loaded") < 1 or \
            router_series(pod.sup, "supervisor_router_cache_events_read") < 2:
        if time.monotonic() > deadline:
            raise RuntimeError("the cache policy never read both ranks' events")
        time.sleep(0.5)


def run_policy(model: str, policy: str, work: list[tuple[str, str]], clients: int, tmp: Path, name: str) -> dict:
    pod = Pod(model, policy, tmp / f"{name}-{policy}.log")
    try:
        for port in pod.ports:  # one short request each: the first request's own start-up is not measured
            ask_direct = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            ask_direct.request("POST", "/v1/completions", body=json.dumps(
                {"model": SERVED, "prompt": "Hello", "max_tokens": 1}), headers={"Content-Type": "application/json"})
            ask_direct.getresponse().read()
        if policy == "cache":
            cache_ready(pod)
        h0, q0 = counters(pod.ports)
        p0, cpu0 = router_series(pod.sup, "supervisor_router_cache_predicted_hit_tokens_total"), router_cpu(pod.sup)
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda w: ask(pod.router, *w), work))
        took = time.monotonic() - t0
        time.sleep(1.5)  # the workers' counters reach the supervisor twice a second
        h1, q1 = counters(pod.ports)
        p1, cpu1 = router_series(pod.sup, "supervisor_router_cache_predicted_hit_tokens_total"), router_cpu(pod.sup)
        kv_tokens = kv_cache_tokens(tmp / f"{name}-{policy}.log")
    finally:
        code = pod.close()
    ttft = [r[0] for r in results]
    return {"policy": policy, "requests": len(results), "hit_rate": (h1 - h0) / max(q1 - q0, 1),
            "predicted_rate": (p1 - p0) / max(q1 - q0, 1) if policy == "cache" else None,
            "ttft_p50": percentile(ttft, 0.5), "ttft_p90": percentile(ttft, 0.9), "seconds": took,
            "throughput": len(results) / took, "cpu_per_1k": (cpu1 - cpu0) / len(results) * 1000,
            "by_rank": {r: sum(1 for x in results if x[2] == r) for r in sorted({x[2] for x in results})},
            "kv_tokens": kv_tokens, "exit": code}


def rounds(prompts: list[str], questions: int, seed: int) -> list[tuple[str, str]]:
    """Every prompt once per round, each round in a new order, `questions` rounds."""
    rng = random.Random(seed)
    work = []
    for q in range(questions):
        order = list(prompts)
        rng.shuffle(order)
        work += [(p, f"Question {q}: which word comes first in the register?") for p in order]
    return work


def popular(prompts: list[str], requests: int, seed: int, s: float = 1.1) -> list[tuple[str, str]]:
    """`requests` draws of the prompts by Zipf popularity."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** s for i in range(len(prompts))]
    return [(p, f"Question {q}: which word comes first in the register?")
            for q, p in enumerate(rng.choices(prompts, weights, k=requests))]


def ceiling(model: str, work: list[tuple[str, str]]) -> float:
    """The best hit rate any routing could reach: each request hits every full block it shares with
    the last request of its system prompt (never its last token), as one cache holding all would."""
    sys.path.insert(0, str(ROOT))
    from vllm_dp_supervisor.kvcache import model_files
    from vllm_dp_supervisor.kvcache.prompts import PromptReader
    from vllm_dp_supervisor.settings.config import ModelSource
    reader = PromptReader(model_files.find(ModelSource(model), os.environ))
    last: dict[str, list[int]] = {}
    hits = total = 0
    for system, question in work:
        ids = reader.token_ids(reader.text("/v1/chat/completions", {"messages": [
            {"role": "system", "content": system}, {"role": "user", "content": question}]}))
        before = last.get(system, [])
        shared = next((i for i, (a, b) in enumerate(zip(before, ids, strict=False)) if a != b),
                      min(len(before), len(ids)))
        hits += min(shared, len(ids) - 1) // 128 * 128
        total += len(ids)
        last[system] = ids
    return hits / total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="shared,many,unique,saturated")
    parser.add_argument("--policies", default="least-requests,prefix,cache")
    parser.add_argument("--requests", type=int, default=140)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "prefix.md"))
    args = parser.parse_args()
    model = subprocess.run([PY, str(ROOT / "demo" / "build_model.py"), "smollm2"], check=True,
                           stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
    workloads = {
        "shared": rounds(system_prompts(14, 475, args.seed), args.requests // 14, args.seed),
        "many": popular(system_prompts(60, 475, args.seed + 1), args.requests, args.seed),
        "unique": [(p, "Question 0: which word comes first in the register?")
                   for p in system_prompts(args.requests, 475, args.seed + 2)],
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    table = ["| workload | policy | hit rate (best possible) | predicted by the router | TTFT p50 | TTFT p90 | "
             "requests/s | router CPU per 1k requests | requests by rank |", "|---|---|---|---|---|---|---|---|---|"]
    goals, kv_tokens, results = [], 0, {}
    saturated: list[str] = []
    for name in args.workloads.split(","):
        if name == "saturated":  # vLLM's own client, least-requests against cache (prefix_saturated.py)
            import prefix_saturated
            saturated = prefix_saturated.rows(model, tmp)
            print("\n".join(saturated), flush=True)
            continue
        work, best = workloads[name], ceiling(model, workloads[name])
        for policy in args.policies.split(","):
            r = results[name, policy] = run_policy(model, policy, work, args.clients, tmp, name)
            kv_tokens = r["kv_tokens"] or kv_tokens
            predicted = "-" if r["predicted_rate"] is None else f"{r['predicted_rate']:.1%}"
            table.append(f"| {name} ({len(work)} requests) | {policy} | {r['hit_rate']:.1%} ({best:.1%}) | "
                         f"{predicted} | "
                         f"{r['ttft_p50'] * 1000:.0f} ms | {r['ttft_p90'] * 1000:.0f} ms | {r['throughput']:.2f} | "
                         f"{r['cpu_per_1k']:.2f} s | {', '.join(f'{k}: {v}' for k, v in r['by_rank'].items())} |")
            print(table[-1], flush=True)
    if ("shared", "cache") in results and ("shared", "least-requests") in results:
        c, lr = results["shared", "cache"], results["shared", "least-requests"]
        hits, ttft = c["hit_rate"] / max(lr["hit_rate"], 1e-9), c["ttft_p50"] / lr["ttft_p50"]
        goals.append(f"- shared: cache's hit rate x{hits:.2f} least-requests' (goal: at least x2; the best possible "
                     f"is x{ceiling(model, workloads['shared']) / max(lr['hit_rate'], 1e-9):.2f}): "
                     f"{'met' if hits >= 2 else 'NOT met'}; its TTFT p50 x{ttft:.2f} (goal: at most x0.5): "
                     f"{'met' if ttft <= 0.5 else 'NOT met'}")
    if ("unique", "cache") in results and ("unique", "least-requests") in results:
        c, lr = results["unique", "cache"], results["unique", "least-requests"]
        tput, ttft = c["throughput"] / lr["throughput"], c["ttft_p50"] / lr["ttft_p50"]
        goals.append(f"- unique: cache's throughput x{tput:.3f} and TTFT p50 x{ttft:.3f} least-requests' (goal: "
                     f"within 5%): {'met' if tput >= 0.95 and ttft <= 1.05 else 'NOT met'}")
    lookup = cache_lookup_bench.table(model)
    lines = ["## Routing by cache and by prefix, real vLLM (CPU), two ranks", "",
             f"SmolLM2-135M; KV cache {KV_BYTES >> 20} MiB per rank ({kv_tokens:,} tokens, as vLLM logs it); "
             f"streamed chats, max_tokens 4, {args.clients} clients; a fresh pod (empty caches) for each row. "
             "shared: 14 system prompts of ~574 tokens, 10 rounds; many: 60 prompts by Zipf popularity; unique: "
             "nothing shared.", "", *table, "", *goals, "", *saturated, *lookup, ""]
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text)
    print(f"logs: {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
