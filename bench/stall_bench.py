"""`make bench-stall`: how fast a hung engine is found, with real vLLM (CPU build) under load.

Two ranks of the tiny test model behind the router, at the supervisor's defaults (deep probe
every 30 s, --stall-timeout 0.3 s), with steady non-streamed completions through the router. Rank
1's EngineCore is SIGSTOPped (vLLM's /health keeps answering 200); measured from the SIGSTOP: when
rank 1 left the rotation (`/ready/1` 503) and when it was declared hung (its state `unhealthy`),
and what the clients saw until its tree was gone (the load then stops: a vLLM starting on two
cores that the load keeps busy can take minutes). Goals: out of rotation within 1 s, declared hung
within 5 s, no request failed. Then the other side: fresh ranks of the demo model sent concurrent
logprobs chats (a slow first pass with the engine at work): no rank killed, /ready 200 throughout.
Writes bench/results/stall.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
sys.path.insert(0, str(ROOT / "tests"))
from load import Load  # noqa: E402 (the tests' client load, every request accounted for)
from router_bench import port_free  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
        try:
            return r.status, json.loads(body)
        except ValueError:
            return r.status, {}
    except OSError:
        return 0, {}
    finally:
        conn.close()


def rank_field(sup: int, rank: int, field: str) -> object:
    """A field of a rank in /status; None when /status did not answer this time."""
    ranks = get(sup, "/status")[1].get("ranks")
    return ranks[rank][field] if ranks else None


def start_pod(model: str, log, max_model_len: int = 512, env_extra: dict[str, str] | None = None,
              quorum: tuple[str, ...] = ("--min-ready-ranks", "2"), kv_bytes: int = 64 << 20,
              ) -> tuple[subprocess.Popen, int, int]:
    """Two ranks of `model` at the defaults, both ready: the process, its API port, its router port.
    `quorum`: the pod's /ready rule (both ranks, unless the default is asked for with ())."""
    sup, router, base = free_port(), free_port(), free_port()
    while not port_free(base + 1):  # the two rank ports are base and base + 1
        base = free_port()
    cmd = [PY, "-m", "vllm_dp_supervisor", "--dp-size-local", "2", *quorum, "--port", str(base),
           "--supervisor-port", str(sup),
           "--router-port", str(router), "--host", "127.0.0.1", "--restart-policy", "on-failure",
           "--", model, "--dtype", "float32", "--max-model-len", str(max_model_len), "--kv-cache-memory-bytes",
           str(kv_bytes), "--enforce-eager"]
    env = {**os.environ, "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
           **(env_extra or {})}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while get(sup, "/ready")[0] != 200 or any(r.get("state") != "ready" for r in get(sup, "/status")[1]["ranks"]):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_pod(proc)
            raise RuntimeError(f"not ready; see {log.name}")
        time.sleep(0.5)
    return proc, sup, router


def stop_pod(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def unready_while(threads: list[threading.Thread], sup: int) -> float:
    """Start `threads`; the seconds /ready was not 200 until they all ended."""
    for t in threads:
        t.start()
    unready, last = 0.0, time.monotonic()
    while any(t.is_alive() for t in threads):
        time.sleep(0.1)
        now = time.monotonic()
        if get(sup, "/ready")[0] != 200:
            unready += now - last
        last = now
    return unready


def slow_first_tokens(model: str, log: Path, chats: int = 6) -> dict:
    """The false hang: `chats` concurrent chats with logprobs and top_logprobs sent to fresh ranks
    (the CPU build's first logprobs pass is slow, its engine busy, its token counters still).
    Measured: ranks killed (attempts), time /ready answered 503, the slowest first token."""
    with open(log, "wb") as out:
        # a cold torch.compile cache, as on a new pod: the first logprobs pass compiles its sampler
        proc, sup, router = start_pod(model, out, 1024, {"TORCHINDUCTOR_CACHE_DIR": str(log.parent / "inductor")},
                                      quorum=())  # the default: half the ranks
        try:
            name = get(get(sup, "/status")[1]["ranks"][0]["port"], "/v1/models")[1]["data"][0]["id"]
            body = json.dumps({"model": name, "messages": [{"role": "user", "content": "Name three colours."}],
                               "logprobs": True, "top_logprobs": 2, "max_tokens": 16, "stream": True})
            firsts: list[float] = []

            def chat() -> None:
                conn = http.client.HTTPConnection("127.0.0.1", router, timeout=300)
                t0 = time.monotonic()
                conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                while line := response.readline():
                    if line.startswith(b"data: {") and b'"content"' in line:
                        firsts.append(time.monotonic() - t0)
                        break
                response.read()
                conn.close()
            unready = unready_while([threading.Thread(target=chat) for _ in range(chats)], sup)
            attempts = [r["attempt"] for r in get(sup, "/status")[1]["ranks"]]
            return {"chats": chats, "answered": len(firsts), "slowest_first": max(firsts, default=None),
                    "killed": sum(attempts), "unready_s": unready}
        finally:
            stop_pod(proc)


def trial(model: str, log: Path) -> dict:
    with open(log, "wb") as out:
        proc, sup, router = start_pod(model, out)
        try:
            status = get(sup, "/status")[1]
            name = get(status["ranks"][0]["port"], "/v1/models")[1]["data"][0]["id"]
            body = {"model": name, "prompt": "Hello", "max_tokens": 8}
            with Load(router, clients=2, stream_every=0, body=body) as load:
                while load.total < 40:
                    time.sleep(0.1)
                server = psutil.Process(status["ranks"][1]["pid"])
                core = next(p for p in server.children(recursive=True) if p.name() == "VLLM::EngineCore")
                core.send_signal(signal.SIGSTOP)
                t0 = time.monotonic()
                out_at = hung_at = None
                while hung_at is None and time.monotonic() - t0 < 180:
                    now = time.monotonic()
                    if out_at is None and get(sup, "/ready/1")[0] == 503:
                        out_at = now - t0
                    if rank_field(sup, 1, "state") in ("unhealthy", "stopping", "exited", "backoff"):
                        hung_at = now - t0
                    time.sleep(0.05)
                # Until rank 1's tree is gone (the requests it held are sent again then), not
                # through its restart: a vLLM starting on 2 busy cores can take minutes.
                while rank_field(sup, 1, "state") not in ("backoff", "starting"):
                    if time.monotonic() - t0 > 240:
                        raise RuntimeError("rank 1 was not stopped")
                    time.sleep(0.1)
            started = time.monotonic()
            while rank_field(sup, 1, "state") != "ready":
                if time.monotonic() - started > 300:
                    raise RuntimeError("rank 1 did not come back")
                time.sleep(0.5)
            return {"out": out_at, "hung": hung_at, "failed": sum(load.failures().values()), "total": load.total,
                    "back": time.monotonic() - t0, "errors": load.errors[:3]}
        finally:
            stop_pod(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--soak-seconds", type=float, default=180,
                        help="the real-traffic soak's length (verdict_soak.py); 0: no soak")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "stall.md"))
    args = parser.parse_args()
    model = subprocess.run([PY, str(ROOT / "demo" / "build_model.py"), "tiny"], check=True,
                           stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
    tmp = Path(tempfile.mkdtemp(prefix="bench-stall-"))
    rows = [trial(model, tmp / f"trial{i}.log") for i in range(args.trials)]
    if not rows:  # --trials 0: only the slow first tokens
        return slow_only(tmp, args.out, args.soak_seconds)
    fmt = lambda v: "never" if v is None else f"{v:.1f} s"  # noqa: E731
    lines = ["## A hung engine under load, real vLLM (CPU), defaults", "",
             "| trial | SIGSTOP -> out of rotation | SIGSTOP -> declared hung | SIGSTOP -> back (load stopped) "
             "| failed requests |", "|---|---|---|---|---|"]
    lines += [f"| {i + 1} | {fmt(r['out'])} | {fmt(r['hung'])} | {fmt(r['back'])} | {r['failed']} of {r['total']:,} |"
              for i, r in enumerate(rows)]
    lines += [f"- trial {i + 1} failure: {e}" for i, r in enumerate(rows) for e in r["errors"]]
    worst_out = max((r["out"] or 1e9) for r in rows)
    worst_hung = max((r["hung"] or 1e9) for r in rows)
    lines += ["", f"- out of rotation within 1 s: {'met' if worst_out <= 1 else 'NOT met'} (worst {fmt(worst_out)})",
              f"- declared hung within 5 s: {'met' if worst_hung <= 5 else 'NOT met'} (worst {fmt(worst_hung)})",
              f"- no failed request: {'met' if all(r['failed'] == 0 for r in rows) else 'NOT met'}", ""]
    lines += slow_lines(tmp, args.soak_seconds)
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text)
    return 0


def slow_only(tmp: Path, out: str, soak_seconds: float) -> int:
    text = "\n".join(slow_lines(tmp, soak_seconds))
    print(text)
    Path(out).write_text(text)
    return 0


def slow_lines(tmp: Path, soak_seconds: float) -> list[str]:
    from verdict_soak import soak_lines  # here: it imports this module's pod helpers
    fmt = lambda v: "never" if v is None else f"{v:.1f} s"  # noqa: E731
    demo = subprocess.run([PY, str(ROOT / "demo" / "build_model.py"), "demo"], check=True,
                          stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
    slow = slow_first_tokens(demo, tmp / "slow.log")
    return ["## Slow first tokens on fresh ranks, real vLLM (CPU), defaults", "",
              f"{Path(demo).name}, two fresh ranks (a cold torch.compile cache; /ready's default quorum: one "
              f"rank), {slow['chats']} concurrent streamed chats with logprobs and "
              "top_logprobs 2 through the router (the CPU build's first logprobs pass is slow: its engine busy, "
              "its token counters still).", "",
              "| chats answered | slowest first token | ranks killed | /ready not 200 |", "|---|---|---|---|",
              f"| {slow['answered']} of {slow['chats']} | {fmt(slow['slowest_first'])} | {slow['killed']} | "
              f"{slow['unready_s']:.1f} s |", "",
              f"- no rank killed, the pod ready throughout: "
              f"{'met' if slow['killed'] == 0 and slow['unready_s'] == 0 else 'NOT met'}", "",
              *(soak_lines(demo, tmp, soak_seconds) if soak_seconds > 0 else [])]


if __name__ == "__main__":
    sys.exit(main())
