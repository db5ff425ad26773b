"""`make bench-stall`: how fast a hung engine is found, with real vLLM (CPU build) under load.

Two ranks of the tiny test model behind the router, at the supervisor's defaults (deep probe
every 30 s, --stall-timeout 3 s), with steady non-streamed completions through the router. Rank
1's EngineCore is SIGSTOPped (vLLM's /health keeps answering 200); measured from the SIGSTOP: when
rank 1 left the rotation (`/ready/1` 503) and when it was declared hung (its state `unhealthy`),
and what the clients saw until its tree was gone (the load then stops: a vLLM starting on two
cores that the load keeps busy can take minutes). Goals: out of rotation within 5 s, declared hung within 30 s, no
request failed. Writes bench/results/stall.md.
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


def trial(model: str, log: Path) -> dict:
    sup, router, base = free_port(), free_port(), free_port()
    while not port_free(base + 1):  # the two rank ports are base and base + 1
        base = free_port()
    cmd = [PY, "-m", "vllm_dp_supervisor", "--dp-size-local", "2", "--min-ready-ranks", "2", "--port", str(base),
           "--supervisor-port", str(sup),
           "--router-port", str(router), "--host", "127.0.0.1", "--restart-policy", "on-failure",
           "--", model, "--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory-bytes", str(64 << 20),
           "--enforce-eager"]
    env = {**os.environ, "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while get(sup, "/ready")[0] != 200:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"not ready; see {log}")
                time.sleep(0.5)
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
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "stall.md"))
    args = parser.parse_args()
    model = subprocess.run([PY, str(ROOT / "demo" / "build_model.py"), "tiny"], check=True,
                           stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
    tmp = Path(tempfile.mkdtemp(prefix="bench-stall-"))
    rows = [trial(model, tmp / f"trial{i}.log") for i in range(args.trials)]
    fmt = lambda v: "never" if v is None else f"{v:.1f} s"  # noqa: E731
    lines = ["## A hung engine under load, real vLLM (CPU), defaults", "",
             "| trial | SIGSTOP -> out of rotation | SIGSTOP -> declared hung | SIGSTOP -> back (load stopped) "
             "| failed requests |", "|---|---|---|---|---|"]
    lines += [f"| {i + 1} | {fmt(r['out'])} | {fmt(r['hung'])} | {fmt(r['back'])} | {r['failed']} of {r['total']:,} |"
              for i, r in enumerate(rows)]
    lines += [f"- trial {i + 1} failure: {e}" for i, r in enumerate(rows) for e in r["errors"]]
    worst_out = max((r["out"] or 1e9) for r in rows)
    worst_hung = max((r["hung"] or 1e9) for r in rows)
    lines += ["", f"- out of rotation within 5 s: {'met' if worst_out <= 5 else 'NOT met'} (worst {fmt(worst_out)})",
              f"- declared hung within 30 s: {'met' if worst_hung <= 30 else 'NOT met'} (worst {fmt(worst_hung)})",
              f"- no failed request: {'met' if all(r['failed'] == 0 for r in rows) else 'NOT met'}", ""]
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
