"""--router-policy cache, end to end: the real CLI over stand-in ranks that keep a prefix cache and
publish their KV events as vLLM does (standin_cache.py), read by the router with the tokenizer and
chat template of a model directory (standin_tokenizer.py). The router's predicted hits are
checked against what the ranks' caches really hit, across a restart and a lost event batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import standin_tokenizer
from harness import FAST, STANDIN_CMD, metrics, request, standin_metric, wait_for

SYSTEM = "You are a pirate who answers in rhymes and never gives up the treasure map. " * 3  # ~15 blocks of 16
OTHER = "Librarian mode: you whisper every answer and cites three sources each time. " * 3
CACHE = ["--router-policy", "cache"]


@pytest.fixture
def model_dir(tmp_path):
    return str(standin_tokenizer.build(tmp_path / "standin-model"))


def ask(run, system: str, question: str, settle: bool = True) -> str:
    """One chat through the router; its rank. `settle`: wait until the router has read every batch of
    KV events the ranks published for it (else the next request may be placed before they arrive,
    and the router predicts fewer hits than the rank then has, never more)."""
    # No model: the base model's (a name the ranks do not serve would be a LoRA's: placed by load).
    body = json.dumps({"messages": [{"role": "system", "content": system},
                                                  {"role": "user", "content": question}]}).encode()
    status, headers, data = request(run, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    assert status == 200, data
    if settle:
        wait_for(lambda: read_all(run), 10, "the router to read every batch the ranks published")
    return headers["x-dp-rank"]


def read_all(run) -> bool:
    """Whether the router has read every batch each rank's current engine published (`run.batches_before`:
    per rank, what the router had read of its earlier engines)."""
    before = getattr(run, "batches_before", {})
    read = series(run, "supervisor_router_cache_event_batches_total")
    published = rank_metric(run, "standin_kv_batches_total")
    return all(read.get(r, 0) - before.get(r, 0) == n for r, n in published.items())


def series(run, name: str) -> dict[str, float]:
    """rank → value of a per-rank series on the supervisor's /metrics."""
    return {dict(labels)["rank"]: v for (n, labels), v in metrics(run).items() if n == name and labels}


def rank_metric(run, name: str) -> dict[str, float]:
    """rank → a series of the rank's own /metrics (the stand-in's, as vLLM's)."""
    return {str(rank["rank"]): standin_metric(rank["port"], name) for rank in run.status()["ranks"]}


def rank_hits(run) -> dict[str, float]:
    """What each rank's prefix cache really hit (vllm:prefix_cache_hits_total, in tokens)."""
    return rank_metric(run, "vllm:prefix_cache_hits_total")


def read_everywhere(run) -> None:
    wait_for(lambda: all(v == 1 for v in series(run, "supervisor_router_cache_events_read").values()) and
             metrics(run).get(("supervisor_router_cache_tokenizer_loaded", ())) == 1, 20,
             "every rank's events read and the tokenizer loaded")


def fallbacks(run) -> dict[str, float]:
    return {dict(labels)["reason"]: v for (n, labels), v in metrics(run).items()
            if n == "supervisor_router_cache_fallbacks_total"}


def predicted(run) -> dict[str, float]:
    return series(run, "supervisor_router_cache_predicted_hit_tokens_total")


def test_prompts_go_to_the_rank_that_holds_their_prefix_and_new_prefixes_spread(start, model_dir):
    run = start(2, options=CACHE, model=model_dir)
    run.wait_ready()
    read_everywhere(run)
    home = ask(run, SYSTEM, "Where is the map?")
    wait_for(lambda: sum(series(run, "supervisor_router_cache_blocks").values()) > 0, 10, "its blocks indexed")
    other = ask(run, OTHER, "What should I read?")
    assert other != home  # a new prefix goes to the rank with room in its cache
    for i in range(6):
        assert ask(run, SYSTEM, f"question {i}") == home
        assert ask(run, OTHER, f"question {i}") == other
    wait_for(lambda: predicted(run) == rank_hits(run), 10, "the router's predicted hits to be the ranks' own")
    assert predicted(run)[home] > 0 and predicted(run)[other] > 0
    assert series(run, "supervisor_router_cache_routed_total") == {home: 7.0, other: 7.0}


def test_after_a_rank_restarts_nothing_is_sent_to_it_for_blocks_its_new_engine_lacks(start, model_dir):
    run = start(2, options=[*CACHE, *FAST], model=model_dir)
    run.wait_ready()
    read_everywhere(run)
    home = ask(run, SYSTEM, "first")
    for i in range(3):
        assert ask(run, SYSTEM, f"again {i}") == home
    wait_for(lambda: predicted(run) == rank_hits(run), 10, "predicted = real before the restart")
    before = {**predicted(run)}
    hits_before = rank_hits(run)
    old = run.rank_pid(int(home))
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: run.status()["ranks"][int(home)]["attempt"] > 0 and run.all_ready(), 20,
             "the killed rank restarted and ready")
    read_everywhere(run)
    run.batches_before = series(run, "supervisor_router_cache_event_batches_total")
    for i in range(4):
        ask(run, SYSTEM, f"after {i}")
    hits_after = rank_hits(run)  # the restarted rank's counters start again from 0
    expected = {r: hits_after[r] + hits_before[r] for r in hits_after}
    wait_for(lambda: predicted(run) == expected, 10, "predicted = real after the restart")
    drops = {dict(l)["reason"]: v for (n, l), v in metrics(run).items()
             if n == "supervisor_router_cache_index_drops_total" and dict(l).get("rank") == home}
    assert drops.get("engine ended", 0) >= 1
    assert predicted(run)[home] - before[home] == hits_after[home]  # no hit claimed that the new engine lacked


def test_a_lost_event_batch_is_replayed_and_the_index_is_whole_again(start, model_dir):
    run = start(2, "--standin-kv-skip", "1", options=CACHE, model=model_dir)
    run.wait_ready()
    read_everywhere(run)
    home = ask(run, SYSTEM, "one")  # batch 0 on its rank
    assert ask(run, OTHER, "two") != home  # batch 0 on the other
    assert ask(run, SYSTEM, "question three " * 4, settle=False) == home  # new blocks: batch 1, never sent
    # Batch 2: the gap is seen and batch 1 replayed. This request was placed before that, without
    # batch 1's blocks: fewer hits predicted than the rank has (never more).
    assert ask(run, SYSTEM, "question four " * 4) == home
    wait_for(lambda: series(run, "supervisor_router_cache_gaps_repaired_total").get(home) == 1, 10, "repaired")
    wait_for(lambda: rank_hits(run)[home] > predicted(run)[home], 10, "the stats of the request placed short")
    short = rank_hits(run)[home] - predicted(run)[home]
    assert ask(run, SYSTEM, "question three " * 4 + "?") == home  # held: batch 1's blocks, replayed
    wait_for(lambda: rank_hits(run)[home] - predicted(run)[home] == short and
             series(run, "supervisor_router_cache_routed_total").get(home) == 4, 10,
             "this request's predicted hit to be the rank's real one, batch 1's blocks counted")
    assert not any(v for (n, _), v in metrics(run).items() if n == "supervisor_router_cache_index_drops_total")


def test_a_rank_whose_events_are_not_read_is_placed_by_load(start, model_dir):
    run = start(2, "--standin-ranks", "1", "--standin-kv-silent", options=CACHE, model=model_dir)
    run.wait_ready()
    wait_for(lambda: metrics(run).get(("supervisor_router_cache_tokenizer_loaded", ())) == 1, 10, "the tokenizer")
    wait_for(lambda: series(run, "supervisor_router_cache_events_read") == {"0": 1.0, "1": 0.0}, 10,
             "rank 0's events read, rank 1's not")
    for i in range(6):
        ask(run, SYSTEM, f"q{i}", settle=False)
    wait_for(lambda: fallbacks(run).get("events not read") == 6, 10, "six placed by load, and why")
    assert not series(run, "supervisor_router_cache_routed_total").get("0")


def test_without_the_model_s_tokenizer_it_routes_by_load_and_says_why_once(start):
    run = start(2, options=CACHE, model="standin-model")
    run.wait_ready()
    for i in range(4):
        ask(run, SYSTEM, f"q{i}", settle=False)
    wait_for(lambda: fallbacks(run).get("no tokenizer") == 4, 10, "four placed by load, and why")
    wait_for(lambda: "cache routing waits for the model's tokenizer" in run.output(), 10, "the warning")
    assert run.output().count("cache routing waits for the model's tokenizer") == 1


def test_dry_run_shows_each_rank_its_own_events_and_bad_configs_exit_2(tmp_path, model_dir):
    def cli(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vllm_dp_supervisor", "--dp-size-local", "2", "--dry-run",
                               "--server-cmd", STANDIN_CMD, *argv], capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)})
    shown = cli(*CACHE, "--", model_dir)
    assert shown.returncode == 0, shown.stderr
    configs = [json.loads(line.split("--kv-events-config ", 1)[1].split(" --")[0].strip("'"))
               for line in shown.stdout.splitlines() if "--kv-events-config" in line]
    assert len(configs) == 2 and configs[0]["endpoint"] != configs[1]["endpoint"]
    assert all(c["endpoint"].startswith("ipc://") and c["enable_kv_cache_events"] for c in configs)
    for argv, said in [
        ((*CACHE, "--", model_dir, "--kv-events-config", '{"enable_kv_cache_events": false}'), "must enable them"),
        ((*CACHE, "--", model_dir, "--no-enable-prefix-caching"), "turn off"),
        ((*CACHE, "--", "--dtype", "float32"), "name the model"),
        (("--router-cache-weight", "3", "--", model_dir), "apply to --router-policy cache"),
    ]:
        refused = cli(*argv)
        assert refused.returncode == 2 and said in refused.stderr, (argv, refused.stderr)


def checks(run) -> dict[str, float]:
    """The per-request check, summed over ranks: requests checked, tokens over- and under-credited."""
    return {name: sum(series(run, f"supervisor_router_cache_{name}_total").values())
            for name in ("checked", "over_credited", "over_credited_tokens", "under_credited_tokens")}


def settled_offsets(run) -> None:
    """From now on, read_all counts only what the ranks publish next (a restarted engine's counters
    start from 0; a new router worker reads its ranks' buffered batches again)."""
    published = rank_metric(run, "standin_kv_batches_total")
    read = series(run, "supervisor_router_cache_event_batches_total")
    run.batches_before = {r: read.get(r, 0) - n for r, n in published.items()}


def test_each_request_s_prediction_is_checked_against_what_its_rank_says_it_hit(start, model_dir):
    """vLLM's --enable-prompt-tokens-details: every answer tells the prompt tokens its rank's
    prefix cache hit. The router credits none it lacks: in steady state, after a rank restarts
    (its new engine holds nothing) and after a router worker restarts (its index rebuilt)."""
    run = start(2, "--enable-prompt-tokens-details", options=[*CACHE, *FAST], model=model_dir)
    run.wait_ready()
    read_everywhere(run)
    settled_offsets(run)

    def rounds(tag: str) -> str:
        home = ask(run, SYSTEM, f"{tag} first")
        for i in range(2):  # a non-streamed chat and a stream with usage (the client reads it as vLLM sends it)
            assert ask(run, SYSTEM, f"{tag} {i}") == home
            body = json.dumps({"stream": True, "stream_options": {"include_usage": True},
                               "messages": [{"role": "system", "content": SYSTEM},
                                            {"role": "user", "content": f"{tag} streamed {i}"}]})
            status, headers, data = request(run, "POST", "/v1/chat/completions", body.encode(),
                                            {"Content-Type": "application/json"})
            assert status == 200 and headers["x-dp-rank"] == home and b'"cached_tokens"' in data, data
            wait_for(lambda: read_all(run), 10, "the router to read every batch")
        return home

    home = rounds("steady")
    wait_for(lambda: checks(run)["checked"] == 5, 10, "five requests checked")
    assert checks(run) == {"checked": 5, "over_credited": 0, "over_credited_tokens": 0, "under_credited_tokens": 0}
    assert predicted(run) == rank_hits(run)

    os.kill(run.rank_pid(int(home)), signal.SIGKILL)
    wait_for(lambda: run.status()["ranks"][int(home)]["attempt"] > 0 and run.all_ready(), 20, "the rank restarted")
    read_everywhere(run)
    settled_offsets(run)
    rounds("after a rank restart")
    wait_for(lambda: checks(run)["checked"] == 10, 10, "ten requests checked")
    assert checks(run)["over_credited"] == 0 and checks(run)["under_credited_tokens"] == 0

    before = sum(predicted(run).values())
    worker = run.status()["router"]["workers"][0]["pid"]
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: [w["pid"] for w in run.status()["router"]["workers"]] not in ([], [worker]), 10, "a new worker")
    read_everywhere(run)
    settled_offsets(run)
    rounds("after a worker restart")
    wait_for(lambda: checks(run)["checked"] == 15, 10, "fifteen requests checked")
    assert checks(run)["over_credited"] == 0 and checks(run)["under_credited_tokens"] == 0
    assert sum(predicted(run).values()) > before  # the new worker's index was rebuilt: it credits hits
