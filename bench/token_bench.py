"""The token path (issue 36): streamed chunks per second through a router, and its CPU per chunk.
vLLM sends one SSE chunk per token per stream, and every one passes through the router: its load
is chunks, not requests. Two fast stand-in ranks (bench/fast_rank.py) stream vLLM 0.32's chat
chunks, 200 tokens a request, token ids only when asked; wrk (1 thread, 32 connections) asks.

Pinned as the issue measured it: the proxy under test (our router's workers, or nginx's one
worker) on core 0, the ranks and wrk on core 1; the same ranks, client and run for every row.
Rows: direct to one rank (the stand-ins' ceiling), nginx with one worker, ours with one worker
(a client that did not ask token ids: the router asks them and keeps the stream resumable; a
client that asked them: passed through), ours with two workers (both on core 0 beside nothing
else: they share it). Goals: one worker relays >= 50% of nginx's chunks/s with resume on, at
<= 2.5x nginx's CPU per chunk; pass-through <= 1.5x.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from router_bench import Pod, _cpu, free_port, nginx, wait_until

ROOT = Path(__file__).resolve().parent.parent
TOKENS = 200
SECONDS = 10
CONNECTIONS = 32
PROXY_CORE, OTHERS_CORE = "0", "1"


def body(ids: bool) -> str:
    return json.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                       **({"return_token_ids": True} if ids else {})}, separators=(",", ":"))


def pin(pids: list[int], core: str) -> None:
    for pid in pids:
        try:
            for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
                p.cpu_affinity([int(core)])
        except psutil.Error:
            pass


def drive(port: int, ids: bool, pids: list[int]) -> dict[str, float]:
    """wrk on core 1 for SECONDS: chunks/s, and `pids`' CPU seconds per 1M chunks."""
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(f'wrk.method = "POST"\nwrk.body = \'{body(ids)}\'\n'
                      'wrk.headers["Content-Type"] = "application/json"\n')
    before = _cpu(pids)
    out = subprocess.run(["taskset", "-c", OTHERS_CORE, "wrk", "-t", "1", "-c", str(CONNECTIONS), "-d",
                          f"{SECONDS}s", "-s", str(script), f"http://127.0.0.1:{port}/v1/chat/completions"],
                         capture_output=True, text=True, check=False).stdout
    cpu = _cpu(pids) - before
    script.unlink()
    found = re.search(r"(\d+) requests in ([\d.]+)s", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if not found or non2xx:
        raise RuntimeError(f"wrk: {out}")
    chunks = int(found.group(1)) * TOKENS
    return {"chunks_s": chunks / float(found.group(2)), "cpu_per_m": cpu / chunks * 1e6 if pids else float("nan")}


def rows() -> list[dict]:
    results = []
    env = {"FAST_RANK_TOKENS": str(TOKENS)}
    pod = Pod(router=True, workers=1, env=env)
    try:
        pin([r["pid"] for r in pod.status()["ranks"]], OTHERS_CORE)
        pin([pod.proc.pid], OTHERS_CORE)
        workers = pod.router_pids()
        pin(workers, PROXY_CORE)
        results.append({"path": "direct to one rank (the stand-ins' ceiling)", **drive(pod.ports[0], False, [])})
        tmp = Path(tempfile.mkdtemp(prefix="bench-token-"))
        port = free_port()
        cmd = nginx(pod.ports, port, tmp)
        if cmd is not None:
            proc = subprocess.Popen(["taskset", "-c", PROXY_CORE, *cmd], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                wait_until(lambda: _listening(port), 10)
                nginx_pids = [proc.pid, *[c.pid for c in psutil.Process(proc.pid).children(recursive=True)]]
                results.append({"path": "nginx, 1 worker", **drive(port, False, nginx_pids)})
            finally:
                proc.terminate()
                proc.wait(10)
        results.append({"path": "ours, 1 worker, client did not ask token ids (resumable: ids asked, written null)",
                        **drive(pod.router, False, workers)})
        results.append({"path": "ours, 1 worker, client asked token ids (passed as sent)",
                        **drive(pod.router, True, workers)})
    finally:
        pod.close()
    pod = Pod(router=True, workers=2, env=env)
    try:
        pin([r["pid"] for r in pod.status()["ranks"]] + [pod.proc.pid], OTHERS_CORE)
        workers = pod.router_pids()
        pin(workers, PROXY_CORE)
        results.append({"path": "ours, 2 workers on the same core, client did not ask token ids",
                        **drive(pod.router, False, workers)})
    finally:
        pod.close()
    return results


def _listening(port: int) -> bool:
    import socket
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def table(results: list[dict]) -> list[str]:
    by = {r["path"].split(",")[0] + ("" if "2 workers" not in r["path"] else " 2") +
          (" ids" if "asked token ids (passed" in r["path"] else ""): r for r in results}
    nginx_row = by.get("nginx")
    lines = [f"## The token path: {TOKENS} vLLM 0.32 chat chunks a request, wrk 1 thread x {CONNECTIONS} connections, "
             f"{SECONDS} s; the proxy on core {PROXY_CORE}, ranks and wrk on core {OTHERS_CORE}", "",
             "| path | chunks/s | CPU s per 1M chunks | of nginx's chunks/s | CPU x nginx |", "|---|---|---|---|---|"]
    for r in results:
        share = f"{r['chunks_s'] / nginx_row['chunks_s']:.0%}" if nginx_row else "-"
        ratio = f"x{r['cpu_per_m'] / nginx_row['cpu_per_m']:.2f}" if nginx_row and r["cpu_per_m"] == r["cpu_per_m"] \
            else "-"
        cpu = f"{r['cpu_per_m']:.1f}" if r["cpu_per_m"] == r["cpu_per_m"] else "-"
        lines.append(f"| {r['path']} | {r['chunks_s']:,.0f} | {cpu} | {share} | {ratio} |")
    if nginx_row:
        ours, ids = by["ours"], by["ours ids"]
        lines += ["", f"- one worker, resume on: {ours['chunks_s'] / nginx_row['chunks_s']:.0%} of nginx's chunks/s "
                      f"(goal >= 50%): {'met' if ours['chunks_s'] >= 0.5 * nginx_row['chunks_s'] else 'NOT met'}; "
                      f"CPU per chunk x{ours['cpu_per_m'] / nginx_row['cpu_per_m']:.2f} nginx's (goal <= 2.5): "
                      f"{'met' if ours['cpu_per_m'] <= 2.5 * nginx_row['cpu_per_m'] else 'NOT met'}",
                  f"- pass-through: CPU per chunk x{ids['cpu_per_m'] / nginx_row['cpu_per_m']:.2f} nginx's "
                  f"(goal <= 1.5): {'met' if ids['cpu_per_m'] <= 1.5 * nginx_row['cpu_per_m'] else 'NOT met'}"]
    return lines


def main() -> int:
    if os.cpu_count() is None or os.cpu_count() < 2:  # type: ignore[operator]
        print("the token bench pins to two cores; this machine has fewer")
        return 1
    started = time.time()
    lines = table(rows())
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "bench" / "results" / "token.md"
    out.write_text(text)
    print(f"({time.time() - started:.0f} s; written to {out})")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
