"""`make demo`: two vLLM ranks under the supervisor, each asked a question, then stopped.

Starts `python -m vllm_dp_supervisor --dp-size-local 2 -- <model> ...` the way an operator would, waits for
`/ready`, asks chat questions and completions through the router's one port, two at a time (the
answer's `x-dp-rank` header says which rank answered each), prints a table, shows `/status`, sends SIGTERM
and prints the supervisor's exit summary. Exits 0 only if all of that worked, both ranks
answered, and no process of the run is left.

    python demo/demo.py                 # real vLLM (CPU build), SmolLM2-135M built offline
    python demo/demo.py --standin       # the test stand-in instead of vLLM: seconds, no model
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHAT_QUESTIONS = ["What is the capital of France? Answer in one sentence.",
                  "What is the capital of Italy? Answer in one sentence."]
COMPLETION_PROMPTS = ["The three primary colors are", "The largest planet in the solar system is"]
SERVED_NAME = "demo-model"


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def http(method: str, url: str, body: dict | None = None, timeout: float = 120) -> tuple[int, dict]:
    return http_with_rank(method, url, body, timeout)[:2]


def http_with_rank(method: str, url: str, body: dict | None = None,
                   timeout: float = 120) -> tuple[int, dict, str]:
    """Status, JSON body, and the rank that answered (the router's x-dp-rank header)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null"), r.headers.get("x-dp-rank", "?")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), e.headers.get("x-dp-rank", "?")


def build_model(which: str) -> str:
    say(f"preparing the {which} model (built on the first run, then cached)")
    out = subprocess.run([sys.executable, str(ROOT / "demo" / "build_model.py"), which],
                         check=True, stdout=subprocess.PIPE, text=True)
    return out.stdout.strip().splitlines()[-1]


def server_setup(args: argparse.Namespace) -> tuple[list[str], list[str], dict[str, str]]:
    """Supervisor options, the servers' arguments, and extra environment."""
    if args.standin:
        return (["--server-cmd", f"{sys.executable} {ROOT / 'tests' / 'standin.py'}",
                 "--devices", "0,1"],
                [SERVED_NAME, "--standin-completion-delay", "0.3"],  # so the two of a pair overlap
                {"CUDA_VISIBLE_DEVICES": "0,1"})
    model = args.model or build_model("demo")
    child = [model, "--served-model-name", SERVED_NAME,
             "--dtype", "float32",            # SmolLM2 answers wrongly in bf16 on the CPU backend
             "--max-model-len", "1024",
             "--kv-cache-memory-bytes", str(64 << 20),
             "--enforce-eager"]               # skips torch.compile warm-up: ready ~30 s sooner
    # The venv's `vllm` command, found the way the default --server-cmd finds it: on PATH.
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1"}
    return [], child, env


def ask_router(port: int) -> list[list[str]]:
    """Every question through the router, two at a time (least requests in flight sends the two
    of a pair to different ranks); a row per answer."""
    base = f"http://127.0.0.1:{port}/v1"
    asks = [("chat", q, "/chat/completions", {"messages": [{"role": "user", "content": q}], "max_tokens": 32})
            for q in CHAT_QUESTIONS]
    asks += [("completion", p, "/completions", {"prompt": p, "max_tokens": 16}) for p in COMPLETION_PROMPTS]

    def one(kind: str, question: str, path: str, body: dict) -> list[str]:
        t0 = time.monotonic()
        code, answer, rank = http_with_rank("POST", base + path, {"model": SERVED_NAME, "temperature": 0, **body})
        took = time.monotonic() - t0
        if code != 200:
            raise RuntimeError(f"{kind} through the router answered {code}: {answer}")
        choice = answer["choices"][0]
        text = choice["message"]["content"] if kind == "chat" else choice["text"]
        return [kind, question[:42], rank, f"{took * 1000:.0f} ms", text.strip().replace("\n", " ")[:60]]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda a: one(*a), asks))


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    options, child, extra_env = server_setup(args)
    log_path = Path(args.log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "vllm_dp_supervisor", "--dp-size-local", "2", "--port", str(args.port),
           "--supervisor-port", str(args.supervisor_port), "--router-port", str(args.router_port),
           "--host", "127.0.0.1", *options, "--", *child]
    say(f"starting: python -m vllm_dp_supervisor --dp-size-local 2 --port {args.port} "
        f"--supervisor-port {args.supervisor_port} --router-port {args.router_port} "
        f"-- {' '.join(child[:1] + ['...'])}")
    say(f"supervisor and rank output: {log_path}")
    with open(log_path, "wb") as log:
        sup = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **extra_env}, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{args.supervisor_port}"
    try:
        t0 = time.monotonic()
        last_report = 0.0
        while True:
            if sup.poll() is not None:
                raise RuntimeError(f"the supervisor exited with {sup.returncode} before /ready")
            try:
                code, body = http("GET", f"{api}/ready", timeout=2)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                code, body = None, None
            waited = time.monotonic() - t0
            if code == 200 and not body.get("not_ready"):  # every rank: the demo uses both
                break
            if waited - last_report >= 10:
                last_report = waited
                waiting = ", ".join(f"rank {r['rank']} {r['state']}" for r in (body or {}).get("not_ready", []))
                say(f"waiting for /ready ({waited:.0f} s): {waiting or 'supervisor starting'}")
            if waited > args.ready_timeout:
                raise RuntimeError(f"/ready not 200 after {args.ready_timeout} s")
            time.sleep(0.25)
        say(f"/ready answered 200 after {time.monotonic() - t0:.1f} s")

        status = http("GET", f"{api}/status")[1]
        ranks = [["rank", "port", "pid", "ready after"]]
        ranks += [[str(r["rank"]), str(r["port"]), str(r["pid"]), f"{r['ready_after_s']:.1f} s"]
                  for r in status["ranks"]]
        print("\n" + table(ranks) + "\n")
        say(f"asking through the router, http://127.0.0.1:{args.router_port}/v1, two questions at a time")
        rows = ask_router(args.router_port)
        print("\n" + table([["kind", "question", "rank", "latency", "answer"], *rows]) + "\n")
        if {row[2] for row in rows} != {"0", "1"}:
            raise RuntimeError(f"expected both ranks to answer, got ranks {sorted({row[2] for row in rows})}")
        print("GET /status\n" + json.dumps(http("GET", f"{api}/status")[1], indent=2) + "\n")

        say("sending SIGTERM to the supervisor")
        t_stop = time.monotonic()
        sup.send_signal(signal.SIGTERM)
        code = sup.wait(timeout=120)
        say(f"supervisor exited with {code} after {time.monotonic() - t_stop:.1f} s; its exit summary:")
        own = [line for line in log_path.read_text(errors="replace").splitlines() if "[supervisor]" in line]
        header = max(i for i, line in enumerate(own) if " rank pid " in line)
        print("\n".join(own[header:]))
        if code != 0:
            raise RuntimeError(f"the supervisor exited with {code}, expected 0 after SIGTERM")
        return 0
    except Exception as exc:  # one clear line, and where to look
        say(f"FAILED: {exc}")
        tail = log_path.read_text(errors="replace").splitlines()[-30:]
        print("last lines of the log:\n" + "\n".join(tail), file=sys.stderr)
        return 1
    finally:
        if sup.poll() is None:
            sup.send_signal(signal.SIGTERM)
            try:
                sup.wait(timeout=60)
            except subprocess.TimeoutExpired:
                sup.kill()
                sup.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--standin", action="store_true", help="use the test stand-in instead of vLLM")
    parser.add_argument("--model", help="a local model directory (default: build SmolLM2-135M offline)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--supervisor-port", type=int, default=9256)
    parser.add_argument("--router-port", type=int, default=8080)
    parser.add_argument("--ready-timeout", type=float, default=300)
    parser.add_argument("--log", default=str(ROOT / ".demo" / "supervisor.log"))
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
