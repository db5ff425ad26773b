"""The cache policy over real vLLM (the CPU build): the KV events its engines publish are read as
the router reads them (kvcache/wire.py), their tokens are the ones the router computes from the
model's own tokenizer and chat template, their block hashes are vLLM 0.32's as the stand-in
computes them (standin_cache.py), and the hits the router predicts are the ones the engine
counts. A user's own --kv-events-config is kept for rank 0 and moved by one port for rank 1.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request

import pytest
import zmq
from harness import free_ports, metrics, request, tagged_processes, wait_for
from standin_cache import NONE_HASH, block_hash, external

from vllm_dp_supervisor.kvcache import model_files, wire
from vllm_dp_supervisor.kvcache.prompts import PromptReader
from vllm_dp_supervisor.settings.config import ModelSource

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]
READY_S = 240
SYSTEM = ("You are the ship's navigator. Answer every question about the sea, the stars and the winds "
          "with care, name the instrument you would use, and say how sure you are. ") * 4  # ~2-3 blocks of 128


def replayed(endpoint: str) -> list[wire.Batch]:
    """Every batch the engine still holds, asked of its replay endpoint as the router asks it."""
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVTIMEO, 10_000)
    try:
        dealer.connect(endpoint)
        dealer.send_multipart(wire.replay_request(0))
        batches = []
        while (batch := wire.read_replayed(dealer.recv_multipart())) is not None:
            batches.append(batch)
        return batches
    finally:
        dealer.close(0)
        context.term()


def chat(question: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            "max_tokens": 1, "temperature": 0}


def ask(run, path: str, body: dict) -> str:
    status, headers, data = request(run, "POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"},
                                    timeout=300)
    assert status == 200, data
    return headers["x-dp-rank"]


def series(run, name: str) -> dict[str, float]:
    return {dict(labels)["rank"]: v for (n, labels), v in metrics(run).items() if n == name and labels}


def engine_hits(run, rank: str) -> float:
    port = run.status()["ranks"][int(rank)]["port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:prefix_cache_hits_total"))


def test_real_kv_events_are_read_keyed_by_the_router_s_tokens_and_predict_the_engine_s_hits(vllm_run, tiny_model, tag):
    events, replay = free_ports(2), free_ports(2)
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{events[0]}",
              "replay_endpoint": f"tcp://*:{replay[0]}", "topic": "kv"}
    run = vllm_run(2, "--kv-events-config", json.dumps(config), "--enable-prompt-tokens-details",
                   options=["--router-policy", "cache"],
                   env={"VLLM_SERVER_DEV_MODE": "1", "VLLM_ENABLE_RESPONSES_API_STORE": "1"})
    run.wait_ready(READY_S)
    wait_for(lambda: metrics(run).get(("supervisor_router_cache_tokenizer_loaded", ())) == 1 and
             set(series(run, "supervisor_router_cache_events_read").values()) == {1.0}, 60, "events read")

    first = chat("Which star points north?")
    home = ask(run, "/v1/chat/completions", first)
    # The wire, as vLLM 0.32 writes it: a BlockStored per prefill, 128-token blocks (the CPU
    # backend's), the first block's parent none, integer hashes of sha256(pickle(parent, tokens, None)).
    stored = [e for b in replayed(f"tcp://127.0.0.1:{replay[int(home)]}") for e in b.events
              if isinstance(e, wire.Stored)]
    assert stored and stored[0].parent is None and stored[0].block_size == 128
    tokens = [t for e in stored for t in e.tokens]
    reader = PromptReader(model_files.find(ModelSource(tiny_model), os.environ))
    ours = reader.token_ids(reader.text("/v1/chat/completions", first))
    assert len(tokens) >= 256 and tokens == ours[:len(tokens)]  # the template and tokenizer are vLLM's
    parent, hashes = NONE_HASH, []
    for i in range(0, len(tokens), 128):
        parent = block_hash(parent, tokens[i:i + 128])
        hashes.append(external(parent))
    assert [h for e in stored for h in e.hashes] == hashes

    def settled() -> bool:  # the router has read every batch both engines published
        published = sum(len(replayed(f"tcp://127.0.0.1:{port}")) for port in replay)
        return sum(series(run, "supervisor_router_cache_event_batches_total").values()) == published

    wait_for(settled, 60, "the first chat's events read")
    hits_before = engine_hits(run, home)
    # Streamed with usage: the router reads the cached tokens of the rank's usage chunk, which the
    # client reads as vLLM wrote it (its system_fingerprint included).
    status, headers, data = request(run, "POST", "/v1/chat/completions", json.dumps(
        {**chat("And which wind brings rain?"), "stream": True, "stream_options": {"include_usage": True}}).encode(),
        {"Content-Type": "application/json"}, timeout=300)
    assert status == 200 and headers["x-dp-rank"] == home and data.endswith(b"data: [DONE]\n\n"), data
    usage = json.loads(data.split(b"data: ")[-2])
    assert usage["usage"]["prompt_tokens_details"]["cached_tokens"] >= 256 and "system_fingerprint" in usage, usage
    prompt = {"prompt": SYSTEM + " The tide tables say", "max_tokens": 1, "temperature": 0}
    holder = ask(run, "/v1/completions", prompt)
    wait_for(settled, 60, "the completion's events read")
    assert ask(run, "/v1/completions", prompt) == holder
    wait_for(lambda: sum(series(run, "supervisor_router_cache_routed_total").values()) == 4, 30, "counted")
    predicted = series(run, "supervisor_router_cache_predicted_hit_tokens_total")
    real = {r: engine_hits(run, r) for r in ("0", "1")}
    assert real[home] - hits_before >= 256 and predicted == real, (predicted, real)
    # Request by request: what each answer said its rank hit is what the router credited it.
    checked = {name: sum(series(run, f"supervisor_router_cache_{name}_total").values())
               for name in ("checked", "over_credited_tokens", "under_credited_tokens")}
    assert checked == {"checked": 4, "over_credited_tokens": 0, "under_credited_tokens": 0}, checked

    # vLLM's /reset_prefix_cache through the router reaches both engines (router/control.py): both
    # answer the same, read exactly; their AllBlocksCleared events empty the router's indexes.
    assert any(v > 0 for v in series(run, "supervisor_router_cache_blocks").values())
    status, headers, data = request(run, "POST", "/reset_prefix_cache", b"", timeout=60)
    assert (status, data, headers["x-dp-ranks"]) == (200, b'{"success":true}', "0,1"), data
    wait_for(lambda: set(series(run, "supervisor_router_cache_blocks").values()) == {0.0}, 30, "the indexes emptied")
    status, _, data = request(run, "POST", "/sleep", b"", timeout=60)
    assert status == 501 and b"each rank's own port" in data, data

    # The Responses API's follow-ups find their previous response, stored on one rank only.
    status, _, data = request(run, "POST", "/v1/responses", json.dumps(
        {"input": "Name a star.", "max_output_tokens": 2, "temperature": 0}).encode(),
        {"Content-Type": "application/json"}, timeout=300)
    assert status == 200, data
    previous = json.loads(data)["id"]
    for _ in range(3):
        status, headers, data = request(run, "POST", "/v1/responses", json.dumps(
            {"input": "Another.", "previous_response_id": previous, "max_output_tokens": 2,
             "temperature": 0}).encode(), {"Content-Type": "application/json"}, timeout=300)
        assert status == 200, data
        previous = json.loads(data)["id"]
    status, _, data = request(run, "GET", f"/v1/responses/{previous}", timeout=60)
    assert status == 200 and json.loads(data)["id"] == previous, data

    # A SIGKILLed supervisor leaves no vLLM process behind (here rather than in a test of its own:
    # a cold start of two real ranks costs ~50 s of the suite).
    assert len(tagged_processes(tag)) >= 7  # the supervisor, and per rank its server, engine and worker
    run.send(signal.SIGKILL)
    wait_for(lambda: not tagged_processes(tag), 15, "every vLLM process gone")
