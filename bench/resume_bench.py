"""`make bench-resume`: streams cut by a rank's failure, continued on the other rank, with real vLLM
(CPU build) on this machine: two ranks of the demo model (SmolLM2-135M, float32), greedy streamed
chats and completions through the router.

Per trial: an uninterrupted answer straight from a rank (the reference), then the same request
through the router, whose rank gets, after a given number of tokens, one of: SIGKILL of its API
server, SIGKILL of its EngineCore, SIGSTOP of its EngineCore (a hung engine: /health stays 200).
Measured: the stream completes without an error event; its text equals the reference's; the gap
the client sees at the cut (the last token before it to the first after it), against the time to
first token of a cold prompt as long as the continuation's (uncached token ids, on the other rank,
idle). Goal: every stream whole and identical; the gap at most 2x that cold time to first token
(the hung engine's gap includes --stall-timeout, the time it takes to notice). Writes
bench/results/resume.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from prefix_bench import PY, ROOT, SERVED, Pod, get_json

MAX_TOKENS = 64
# (label, path, body): English chats and a completion with a limit; a Japanese completion, whose
# answer is kana and kanji (most of them two or three byte tokens each in SmolLM2's byte-level BPE,
# so a cut falls inside a character); a chat without max_tokens (the openai SDK's default shape:
# its continuation's limit is the rest of the context, not vLLM's 16).
PROMPTS: list[tuple[str, str, dict]] = [
    ("chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": "What is the capital of France? "
                                                    "Tell me about the city."}], "max_tokens": MAX_TOKENS}),
    ("chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Write a short story about a "
                                                    "lighthouse keeper and a storm."}], "max_tokens": MAX_TOKENS}),
    ("completion", "/v1/completions", {"prompt": "The history of the printing press begins", "max_tokens": MAX_TOKENS}),
    ("Japanese completion", "/v1/completions", {"prompt": "東京は日本の首都です。東京には", "max_tokens": MAX_TOKENS}),
    ("chat, no max_tokens", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me about "
                                                                   "the moon in three sentences."}]}),
]
KINDS = ("API server SIGKILL", "EngineCore SIGKILL", "EngineCore SIGSTOP (hung)")


def stream(port: int, path: str, body: dict, at_token=None) -> dict:
    """A greedy streamed answer: its text, whether it ended whole, the time of each content chunk."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    payload = {"model": SERVED, "stream": True, "temperature": 0, **body}
    t0 = time.monotonic()
    conn.request("POST", path, json.dumps(payload), {"Content-Type": "application/json"})
    response = conn.getresponse()
    text, times, whole, error, tail = "", [], False, None, []
    while line := response.readline():
        if not line.startswith(b"data: "):
            continue
        tail = [*tail[-3:], line.decode(errors="replace").strip()[:300]]
        if line.strip() == b"data: [DONE]":
            whole = True
            break
        chunk = json.loads(line[6:])
        if "error" in chunk:
            error = chunk["error"]
            continue
        for choice in chunk["choices"]:
            piece = choice["delta"].get("content") if "delta" in choice else choice.get("text")
            if piece:
                text += piece
                times.append(time.monotonic() - t0)
                if at_token is not None:
                    at_token(len(times), response.getheader("x-dp-rank"))
    conn.close()
    return {"text": text, "whole": whole and error is None, "times": times, "error": error, "tail": tail}


def cold_ttft(port: int, length: int, rng: random.Random) -> float:
    """Time to first token of a prompt of `length` token ids that no cache holds."""
    body = {"model": SERVED, "prompt": [rng.randrange(100, 40000) for _ in range(length)], "max_tokens": 1,
            "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.monotonic()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    while line := response.readline():
        if line.startswith(b"data: {"):
            break
    took = time.monotonic() - t0
    conn.close()
    return took


def prompt_tokens(port: int, path: str, body: dict) -> int:
    payload = {"model": SERVED, **body}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/tokenize", json.dumps(payload), {"Content-Type": "application/json"})
    count = int(json.loads(conn.getresponse().read())["count"])
    conn.close()
    return count


def victim(pod: Pod, rank: int, kind: str) -> int:
    server = get_json(pod.sup, "/status", 60)[1]["ranks"][rank]["pid"]  # type: ignore[index]
    if kind.startswith("API"):
        return server
    children = psutil.Process(server).children(recursive=True)
    return next(c.pid for c in children if c.name().startswith("VLLM::EngineCore"))


def router_gaps(pod: Pod) -> tuple[float, int]:
    """The router's own resume-gap histogram: sum of seconds and count, from the pod's /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", pod.sup, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    found = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
             if line.startswith("supervisor_router_resume_gap_seconds_")}
    return found.get("supervisor_router_resume_gap_seconds_sum", 0.0), int(
        found.get("supervisor_router_resume_gap_seconds_count", 0))


def attempts(pod: Pod) -> list[int]:
    return [r["attempt"] for r in get_json(pod.sup, "/status", 60)[1]["ranks"]]


def whole_again(pod: Pod, before: list[int], rank: int) -> None:
    """Every rank ready, the failed one on a new attempt: its death may be noticed after the
    stream it cut has already finished elsewhere (an EngineCore's, through the rank's /health)."""
    deadline = time.monotonic() + 600
    while True:
        if pod.proc.poll() is not None:
            raise RuntimeError(f"the pod exited with code {pod.proc.returncode}")
        status = get_json(pod.sup, "/status", 60)[1]
        if isinstance(status, dict) and all(r["state"] == "ready" for r in status["ranks"]) \
                and status["ranks"][rank]["attempt"] > before[rank]:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("the pod did not come back")
        time.sleep(1)


def trial(pod: Pod, kind: str, prompt: tuple[str, str, dict], cut_at: int, reference: dict,
          rng: random.Random) -> dict:
    label, path, body = prompt
    hit: dict = {}
    gap_sum, gap_count = router_gaps(pod)
    before = attempts(pod)

    def fail_its_rank(tokens: int, rank: str) -> None:
        if tokens == 1:  # found now, so that the cut itself is only the signal
            hit.update(rank=int(rank), pid=victim(pod, int(rank), kind))
        if tokens == cut_at:
            os.kill(hit["pid"], signal.SIGSTOP if "SIGSTOP" in kind else signal.SIGKILL)
    got = stream(pod.router, path, body, fail_its_rank)
    gap = got["times"][cut_at] - got["times"][cut_at - 1] if len(got["times"]) > cut_at else None
    other = pod.ports[1 - hit.get("rank", 0)]
    cold = cold_ttft(other, prompt_tokens(other, path, body) + cut_at, rng)
    whole_again(pod, before, hit.get("rank", 0))  # a hung engine is declared hung and restarted; a killed one restarted
    deadline = time.monotonic() + 30  # the workers report their counts every second or so
    while (now := router_gaps(pod))[1] == gap_count and time.monotonic() < deadline:
        time.sleep(0.5)
    router_gap = (now[0] - gap_sum) / (now[1] - gap_count) if now[1] > gap_count else None
    return {"kind": kind, "prompt": label, "path": path, "cut_at": cut_at, "whole": got["whole"],
            "same": got["text"] == reference["text"], "gap": gap, "router_gap": router_gap, "cold_ttft": cold,
            **({} if got["text"] == reference["text"] else {"got": got["text"], "expected": reference["text"],
                                                             "tail": got["tail"]})}


def saturated(model: str, tmp: Path, scheduling: str, trials: int, rng: random.Random) -> list[dict]:
    """Gaps of streams cut by their rank's SIGKILL while clients keep both ranks saturated
    (--max-num-seqs 4, 8 clients streaming long answers without pause): the continuation queues
    behind the surviving rank's own waiting requests, unless it goes first (--scheduling-policy
    priority: the router sends it one priority step ahead)."""
    pod = Pod(model, "least-requests", tmp / f"saturated-{scheduling}.log", extra=(
        "--restart-policy", "on-failure", "--restart-backoff", "0.5", "--max-restarts", "1000", "--stable-after", "1"),
        server_extra=("--max-num-seqs", "4", "--scheduling-policy", scheduling))
    stop, served = threading.Event(), [0]
    label, path, body = PROMPTS[1]

    def client() -> None:
        payload = {"messages": [{"role": "user", "content": "Tell me a long story about the sea."}], "max_tokens": 200}
        while not stop.is_set():
            got = stream(pod.router, "/v1/chat/completions", payload)
            served[0] += got["whole"]
    rows = []
    threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    try:
        reference = stream(pod.ports[0], path, body)
        for t in threads:
            t.start()
        time.sleep(10)  # the load settles: both ranks' queues fill (a measurement's warm-up, not a wait for a state)
        for _ in range(trials):
            rows.append({**trial(pod, "API server SIGKILL", (label, path, body), 20, reference, rng),
                         "scheduling": scheduling})
            print(rows[-1], flush=True)
    finally:
        stop.set()
        pod.close()
        for t in threads:
            t.join(60)
    return rows


def saturated_table(rows: list[dict]) -> list[str]:
    lines = ["## The gap under saturation", "",
             "Two SmolLM2 ranks (--max-num-seqs 4) kept saturated by 8 clients streaming 200-token answers; a greedy "
             "chat's rank SIGKILLed after 20 tokens. The text is not compared here: vLLM's batches change its "
             "numerics under load, the uninterrupted answer's too.", "",
             "| --scheduling-policy | streams | whole | gap, median (max) | cold TTFT of that length, on the loaded "
             "rank |",
             "|---|---|---|---|---|"]
    for scheduling in ("fcfs", "priority"):
        mine = [r for r in rows if r["scheduling"] == scheduling]
        gaps = [r["gap"] for r in mine if r["gap"] is not None]
        if not mine:
            continue
        gap = f"{statistics.median(gaps):.1f} s ({max(gaps):.1f} s)" if gaps else "-"
        lines.append(f"| {scheduling} | {len(mine)} | {sum(r['whole'] for r in mine)} | {gap} | "
                     f"{statistics.median(r['cold_ttft'] for r in mine) * 1000:.0f} ms |")
    return [*lines, ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuts", default="5,20,40", help="tokens after which the rank fails")
    parser.add_argument("--kinds", default=",".join(KINDS), help="which failures (comma-separated)")
    parser.add_argument("--saturated", type=int, default=0,
                        help="also this many cuts per scheduling policy under saturation (fcfs, priority)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "resume.md"))
    args = parser.parse_args()
    model = subprocess.run([PY, str(ROOT / "demo" / "build_model.py"), "smollm2"], check=True,
                           stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
    tmp = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    rng = random.Random(11)
    pod = Pod(model, "least-requests", tmp / "pod.log", extra=(
        "--restart-policy", "on-failure", "--restart-backoff", "0.5", "--max-restarts", "1000"))
    rows = []
    try:
        references = [stream(pod.ports[0], path, body) for _, path, body in PROMPTS]
        for kind in (k for k in KINDS if k in args.kinds.split(",")):
            for prompt, reference in zip(PROMPTS, references, strict=True):
                for cut in (int(c) for c in args.cuts.split(",")):
                    if cut < len(reference["times"]):
                        rows.append(trial(pod, kind, prompt, cut, reference, rng))
                        print(rows[-1], flush=True)
    finally:
        code = pod.close()
    table = ["| failure | streams | whole, no error event | text identical | gap the client sees, median (max) | "
             "of which the router's (cut noticed to continuation out), median | cold TTFT of that length, median "
             "| gap / cold TTFT, median (max) |", "|---|---|---|---|---|---|---|---|"]
    goals = []
    for kind in KINDS:
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        gaps = [r["gap"] for r in mine if r["gap"] is not None]
        ratios = [r["gap"] / r["cold_ttft"] for r in mine if r["gap"] is not None]
        colds = [r["cold_ttft"] for r in mine]
        routers = [r["router_gap"] for r in mine if r["router_gap"] is not None]
        router_ms = f"{statistics.median(routers) * 1000:.0f} ms" if routers else "-"
        whole, same = sum(r["whole"] for r in mine), sum(r["same"] for r in mine)
        gap_text = f"{statistics.median(gaps) * 1000:.0f} ms ({max(gaps) * 1000:.0f} ms)" if gaps else \
            "- (no stream went past the cut)"
        ratio_text = f"{statistics.median(ratios):.1f}x ({max(ratios):.1f}x)" if ratios else "-"
        table.append(f"| {kind} | {len(mine)} | {whole} | {same} | {gap_text} | {router_ms} | "
                     f"{statistics.median(colds) * 1000:.0f} ms | {ratio_text} |")
        met = whole == same == len(mine) and (kind.endswith("(hung)") or (bool(ratios) and max(ratios) <= 2))
        goals.append(f"- {kind}: {whole}/{len(mine)} whole, {same}/{len(mine)} identical"
                     + ("" if kind.endswith("(hung)") else f", gap at most 2x cold TTFT: {ratio_text}")
                     + f": {'met' if met else 'NOT met'}")
        goals += [f"  - not identical ({r['prompt']}, cut after {r['cut_at']}): got {r['got']!r}; "
                  f"expected {r['expected']!r}; the stream's last events: {r['tail']}" for r in mine if not r["same"]]
    by_prompt = ["| prompt | answer (reference, first 40 characters) | streams | whole | identical |",
                 "|---|---|---|---|---|"]
    for label in dict.fromkeys(label for label, _, _ in PROMPTS):
        mine = [r for r in rows if r["prompt"] == label]
        answers = " / ".join(repr(ref["text"][:40]) for (lab, _, _), ref in zip(PROMPTS, references, strict=True)
                             if lab == label)
        by_prompt.append(f"| {label} | {answers} | {len(mine)} | {sum(r['whole'] for r in mine)} | "
                         f"{sum(r['same'] for r in mine)} |")
        if mine and not all(r["whole"] and r["same"] for r in mine):
            goals.append(f"- {label}: NOT met (see above)")
    lines = ["## Streams continued on another rank, real vLLM (CPU), two ranks", "",
             f"SmolLM2-135M (float32), greedy; {len(PROMPTS)} prompts ({', '.join(label for label, _, _ in PROMPTS)}; "
             f"max_tokens {MAX_TOKENS} where set) x cuts after {args.cuts} tokens x {len(args.kinds.split(','))} "
             "failures. The reference is the same request straight to a rank, uninterrupted. Pod exit code at the "
             "end: " + str(code) + ".", "", *table, "", *by_prompt, "", *goals, ""]
    if args.saturated:
        saturated_rows = [r for scheduling in ("fcfs", "priority")
                          for r in saturated(model, tmp, scheduling, args.saturated, rng)]
        lines += saturated_table(saturated_rows)
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text)
    print(f"logs: {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
