"""vLLM's control endpoints through the router (router/control.py), end to end over stand-in ranks:
a cache reset reaches every rank (the router's own index follows their KV events), a state read
answers for the pod, and what the router would have to honour is refused with each rank's port."""

from __future__ import annotations

import json

import standin_tokenizer
from harness import metrics, request, wait_for


def blocks(run) -> dict[str, float]:
    return {dict(labels)["rank"]: v for (n, labels), v in metrics(run).items()
            if n == "supervisor_router_cache_blocks" and labels}


def test_a_cache_reset_reaches_every_rank_and_sleep_is_refused_naming_their_ports(start, tmp_path):
    model_dir = str(standin_tokenizer.build(tmp_path / "standin-model"))
    run = start(2, options=["--router-policy", "cache"], model=model_dir)
    run.wait_ready()
    wait_for(lambda: metrics(run).get(("supervisor_router_cache_tokenizer_loaded", ())) == 1 and
             set(blocks(run)) == {"0", "1"}, 20, "the cache policy reading both ranks")
    system = "You are a pirate who answers in rhymes and never gives up the treasure map. " * 3
    for i in range(4):  # two prefixes: one on each rank
        body = {"messages": [{"role": "system", "content": f"{i % 2} {system}"}, {"role": "user", "content": "hi"}]}
        status, _, data = request(run, "POST", "/v1/chat/completions", json.dumps(body).encode(),
                                  {"Content-Type": "application/json"})
        assert status == 200, data
    wait_for(lambda: all(v > 0 for v in blocks(run).values()), 10, "blocks held on both ranks")

    status, headers, data = request(run, "POST", "/reset_prefix_cache", b"")
    assert (status, json.loads(data), headers["x-dp-ranks"]) == (200, {"success": True}, "0,1")
    wait_for(lambda: blocks(run) == {"0": 0.0, "1": 0.0}, 10, "every rank's cache cleared, as its events say")

    status, headers, data = request(run, "GET", "/is_sleeping")
    assert (status, json.loads(data)) == (200, {"is_sleeping": False})

    status, _, data = request(run, "POST", "/sleep?level=1", b"")
    ports = {r["rank"]: r["port"] for r in run.status()["ranks"]}
    message = json.loads(data)["error"]["message"]
    assert status == 501 and f"rank 0: port {ports[0]}, rank 1: port {ports[1]}" in message, data
    status, _, data = request(run, "POST", "/v1/completions", b'{"prompt": "still awake?", "max_tokens": 2}',
                              {"Content-Type": "application/json"})
    assert status == 200, data
