"""A hung engine found by the router, a slow one left alone: a ready rank that holds requests and
sends nothing back is judged by what its engine does (loops/judge.py). A SIGSTOPped rank is out of
rotation at once and hung within seconds; the stand-in hangs its completions without CPU or tokens
(out of rotation; hung after --hang-timeout: a deadlock looks like a wait on another rank), hangs
them spinning a core (a collective stuck busy-waiting: in rotation, hung after --hang-timeout),
works a core before a stream's first token without counting tokens (vLLM's first logprobs pass on
the CPU build: left in rotation), or "prefills" while counting tokens (working)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time

from harness import FAST, complete, wait_for
from load import Load


def states_of(run, rank: int) -> list[str]:
    return [line.split(f"rank {rank} ", 1)[1].split(":", 1)[0] for line in run.output().splitlines()
            if f"] rank {rank} " in line and ":" in line.split(f"rank {rank} ", 1)[1]]


def test_a_rank_that_hangs_under_load_leaves_rotation_is_declared_hung_and_nothing_is_lost(start):
    # Rank 1 also ignores SIGTERM: a hung rank gets SIGKILL at once, not --stop-timeout's 600 s.
    run = start(2, "--standin-ranks", "1", "--standin-hang-completions-after", "1.5", "--standin-ignore-sigterm",
                options=[*FAST, "--deep-probe-interval", "0", "--stop-timeout", "600", "--hang-timeout", "3"])
    run.wait_ready()
    with Load(run.router_port, clients=4, stream_every=0) as load:
        wait_for(lambda: "rank 1 stalled: its engine did no work for" in run.output(), 30, "rank 1 out of rotation")
        wait_for(lambda: "rank 1 unhealthy: rank 1 hung: requests got nothing back and its engine produced nothing "
                         "for 3 s, idle: no token counted, no one-token completion answered" in run.output(), 30,
                 "rank 1 to be declared hung")
        wait_for(lambda: run.status()["ranks"][1]["attempt"] == 1, 30, "rank 1 restarted")
        total = load.total
        wait_for(lambda: load.total > total + 20, 20, "traffic after the restart")
    # the requests rank 1 held were never answered: sent again to rank 0 when it was stopped
    assert load.failures() == {}, load.errors
    assert "deep probe" not in run.output()
    assert "rank 1: its engine is hung: no graceful stop; SIGKILL to pids" in run.output()
    stalled = [e for e in run.events() if e["kind"] == "stalled"]
    assert stalled and stalled[0]["rank"] == 1


def test_an_engine_that_spins_without_output_is_hung_after_the_hang_timeout(start):
    run = start(2, "--standin-ranks", "1", "--standin-hang-completions-after", "1.5", "--standin-hang-spins",
                options=[*FAST, "--deep-probe-interval", "0", "--hang-timeout", "3"])
    run.wait_ready()
    with Load(run.router_port, clients=2, stream_every=0):
        wait_for(lambda: "rank 1: its engine works" in run.output(), 30, "rank 1 judged busy")
        assert run.get("/ready/1")[0] == 200  # busy: left in rotation
        wait_for(lambda: "rank 1 hung: requests got nothing back and its engine produced nothing for 3 s, busy"
                 in run.output(), 30, "rank 1 to be declared hung")
    assert "rank 1 stalled:" not in run.output()  # never seen idle


def test_a_sigstopped_rank_under_load_is_out_of_rotation_at_once_and_hung_in_seconds(start):
    run = start(2, options=[*FAST, "--deep-probe-interval", "0"])  # the default --hang-timeout: 300 s
    run.wait_ready()
    with Load(run.router_port, clients=4, stream_every=0) as load:
        wait_for(lambda: load.total > 20, 20, "traffic")
        os.kill(run.status()["ranks"][1]["pid"], signal.SIGSTOP)
        wait_for(lambda: "rank 1 stalled: a process of its engine is stopped" in run.output(), 30,
                 "rank 1 out of rotation")
        wait_for(lambda: "rank 1 hung: requests got nothing back and a process of its engine is stopped" in
                 run.output(), 30, "rank 1 to be declared hung")
        wait_for(lambda: run.status()["ranks"][1]["attempt"] == 1, 30, "rank 1 restarted")
    assert load.failures() == {}, load.errors


def test_a_slow_first_token_with_the_engine_at_work_keeps_the_rank_and_the_pod_ready(start):
    """The CPU build's first logprobs pass: 15.9 s to a first token, a core busy, no token counted.
    Under the old rule (token counters alone) both ranks were SIGKILLed as hung."""
    run = start(2, "--standin-busy-first-token", "5", options=["--deep-probe-interval", "0"])
    run.wait_ready()
    answers: list[bytes] = []
    threads = [threading.Thread(target=lambda: answers.append(complete(run, stream=True)[2])) for _ in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: "its engine works" in run.output(), 30, "the ranks judged busy")
    while any(t.is_alive() for t in threads):
        assert run.get("/ready")[0] == 200
        assert all(r["state"] == "ready" for r in run.status()["ranks"])
        time.sleep(0.1)  # sampling /ready while the answers come, not waiting on a condition
    for t in threads:
        t.join()
    assert len(answers) == 2 and all(a.rstrip().endswith(b"data: [DONE]") and b"error" not in a for a in answers)
    out = run.output()
    assert "hung" not in out and "stalled:" not in out
    assert all(r["attempt"] == 0 for r in run.status()["ranks"])


def test_a_long_prefill_is_judged_working_and_its_answer_arrives_whole(start):
    run = start(1, "--standin-first-token-delay", "3", "--standin-stream-chunks", "3",
                options=["--deep-probe-interval", "0"])
    run.wait_ready()
    status, _, body = complete(run, stream=True)
    assert status == 200 and body.rstrip().endswith(b"data: [DONE]") and b"error" not in body
    out = run.output()
    assert "rank 0: 1 request(s) in flight, nothing sent back for" in out
    # its counters moved, or it answered the judge's one-token completion beside the long prefill
    assert re.search(r"rank 0( ready)?: (its token counters moved|it answered a one-token completion in [0-9.]+ s): "
                     r"working", out), out
    rank = run.status()["ranks"][0]
    assert "hung" not in out and rank["state"] == "ready" and rank["attempt"] == 0 and rank["restarts"] == 0


def test_a_client_that_stops_reading_is_not_taken_for_a_stalled_rank(start):
    run = start(1, "--standin-stream-chunks", "400", "--standin-stream-pad", "65536",
                options=["--stall-timeout", "0.3", "--deep-probe-interval", "0"])
    run.wait_ready()
    with socket.create_connection(("127.0.0.1", run.router_port)) as sock:
        body = json.dumps({"model": "standin-model", "prompt": "hi", "stream": True, "max_tokens": 400}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        sock.recv(1024)
        wait_for(lambda: run.status()["ranks"][0]["inflight"] == 1, 5, "the stream in flight")
        deadline = time.monotonic() + 2  # the router pauses the rank; it is quiet because of us
        while time.monotonic() < deadline:
            assert run.status()["ranks"][0]["state"] == "ready"
            time.sleep(0.05)
    assert "stalled" not in run.output()
