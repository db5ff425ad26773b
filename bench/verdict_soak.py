"""The other side of bench-stall: real traffic that is slow but healthy must kill no rank.

Two fresh ranks of the demo model (SmolLM2, a cold torch.compile cache), saturated by CLIENTS
clients for a while, each sending in turn the shapes that made verdicts go wrong: a streamed
chat with logprobs and top_logprobs, a ~4k-token prompt (unique, so no prefix cache hit), a chat
whose output a JSON schema constrains (a new schema now and then: a grammar compile), and a chat
with penalties. Counted: ranks restarted (a healthy rank killed), seconds /ready was not 200,
requests that failed, and per shape the requests and their slowest answer.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from pathlib import Path

from stall_bench import get, start_pod, stop_pod, unready_while

CLIENTS = 8
WORDS = ["river", "mountain", "lantern", "copper", "violet", "harbour", "meadow", "thunder", "pepper", "orbit",
         "canyon", "velvet", "saddle", "marble", "willow", "ember", "quartz", "falcon", "juniper", "tundra"]


def shapes(model: str, n: int) -> tuple[str, str, dict]:
    """The n-th request a client sends: its shape's name, its path and its body."""
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    kind = (n + n // CLIENTS) % 4
    if kind == 0:
        return "logprobs chat", "/v1/chat/completions", {
            "model": model, "messages": user(f"Name three colours ({n})."), "logprobs": True, "top_logprobs": 2,
            "max_tokens": 16, "stream": True}
    if kind == 1:
        rnd = random.Random(n)
        words = " ".join(rnd.choice(WORDS) for _ in range(3650))  # ~4,000 tokens with the demo tokenizer
        return "4k-token prompt", "/v1/completions", {"model": model, "prompt": f"{n}: {words}", "max_tokens": 8}
    if kind == 2:
        key = f"colour_{n // 40}"  # a new schema every 10 of these: a new grammar to compile
        schema = {"type": "object", "properties": {key: {"type": "string"}}, "required": [key]}
        return "structured output", "/v1/chat/completions", {
            "model": model, "messages": user("Give a colour as JSON."), "max_tokens": 24,
            "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}}
    return "penalties chat", "/v1/chat/completions", {
        "model": model, "messages": user("Tell me about rivers."), "max_tokens": 48, "stream": True,
        "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1}


def send(router: int, path: str, body: dict) -> str | None:
    """One request through the router, read to its end: None, or what went wrong."""
    conn = http.client.HTTPConnection("127.0.0.1", router, timeout=600)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            return f"HTTP {response.status}: {data[:160]!r}"
        if body.get("stream") and (b'"error"' in data or not data.rstrip().endswith(b"data: [DONE]")):
            return f"stream: {data[-200:]!r}"
        return None
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    finally:
        conn.close()


def soak(model: str, log: Path, seconds: float) -> dict:
    with open(log, "wb") as out:
        proc, sup, router = start_pod(model, out, 4608, {"TORCHINDUCTOR_CACHE_DIR": str(log.parent / "inductor-soak")},
                                      quorum=(), kv_bytes=512 << 20)
        try:
            name = get(get(sup, "/status")[1]["ranks"][0]["port"], "/v1/models")[1]["data"][0]["id"]
            stats: dict[str, list[float]] = {}
            errors: list[str] = []
            end = time.monotonic() + seconds
            lock = threading.Lock()

            def client(i: int) -> None:
                n = i  # this client's requests: i, i + CLIENTS, ...; their shapes turn through all four
                while time.monotonic() < end:
                    shape, path, body = shapes(name, n)
                    t0 = time.monotonic()
                    error = send(router, path, body)
                    with lock:
                        stats.setdefault(shape, []).append(time.monotonic() - t0)
                        if error:
                            errors.append(f"{shape}: {error}")
                    n += CLIENTS
            unready = unready_while([threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)], sup)
            ranks = get(sup, "/status")[1]["ranks"]
            return {"killed": sum(r["attempt"] for r in ranks), "unready_s": unready, "stats": stats,
                    "errors": errors, "seconds": seconds}
        finally:
            stop_pod(proc)


def soak_lines(demo: str, tmp: Path, seconds: float) -> list[str]:
    r = soak(demo, tmp / "soak.log", seconds)
    lines = ["## Real traffic, slow but healthy, real vLLM (CPU), defaults", "",
             f"{Path(demo).name}, two fresh ranks (cold torch.compile cache, 512 MiB KV cache each), "
             f"{CLIENTS} clients for {r['seconds']:.0f} s sending in turn: a streamed logprobs chat, a "
             "~4k-token unique prompt, a JSON-schema chat (a new schema every 10), a streamed penalties chat.", "",
             "| shape | requests | slowest answer |", "|---|---|---|"]
    lines += [f"| {shape} | {len(times)} | {max(times):.1f} s |" for shape, times in sorted(r["stats"].items())]
    lines += ["", f"Ranks killed (restarts): {r['killed']}; /ready not 200: {r['unready_s']:.1f} s; "
                  f"failed requests: {len(r['errors'])}", ""]
    lines += [f"- failure: {e}" for e in r["errors"][:5]]
    lines += [f"- 0 healthy ranks killed, ready throughout, 0 failed: "
              f"{'met' if r['killed'] == 0 and r['unready_s'] == 0 and not r['errors'] else 'NOT met'}", ""]
    return lines
