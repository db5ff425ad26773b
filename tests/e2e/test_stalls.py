"""A hung engine found by the router: a ready rank that holds requests and sends nothing back
leaves rotation at once, and is declared hung when its token counters do not move; one busy with
a long prefill (its counters move) is put back and left alone. The stand-in hangs its completions
without counting tokens, or "prefills" while counting them."""

from __future__ import annotations

import json

from harness import FAST, complete, wait_for
from load import Load


def states_of(run, rank: int) -> list[str]:
    return [line.split(f"rank {rank} ", 1)[1].split(":", 1)[0] for line in run.output().splitlines()
            if f"] rank {rank} " in line and ":" in line.split(f"rank {rank} ", 1)[1]]


def test_a_rank_that_hangs_under_load_leaves_rotation_is_declared_hung_and_nothing_is_lost(start):
    # Rank 1 also ignores SIGTERM: a hung rank gets SIGKILL at once, not --stop-timeout's 600 s.
    run = start(2, "--standin-ranks", "1", "--standin-hang-completions-after", "1.5", "--standin-ignore-sigterm",
                options=[*FAST, "--deep-probe-interval", "0", "--stall-timeout", "1", "--stop-timeout", "600"])
    run.wait_ready()
    with Load(run.router_port, clients=4, stream_every=0) as load:
        wait_for(lambda: "rank 1 stalled:" in run.output(), 30, "rank 1 to be seen stalled")
        assert run.get("/ready/1")[0] == 503  # out of rotation while judged
        wait_for(lambda: "rank 1 unhealthy: rank 1 hung: requests got nothing back and its token counters did "
                         "not move in 10 s" in run.output(), 30, "rank 1 to be declared hung")
        wait_for(lambda: run.status()["ranks"][1]["attempt"] == 1, 30, "rank 1 restarted")
        total = load.total
        wait_for(lambda: load.total > total + 20, 20, "traffic after the restart")
    # the requests rank 1 held were never answered: sent again to rank 0 when it was stopped
    assert load.failures() == {}, load.errors
    assert "deep probe" not in run.output()
    assert "rank 1: its engine is hung: no graceful stop; SIGKILL to pids" in run.output()


def test_a_long_prefill_is_judged_working_and_its_answer_arrives_whole(start):
    run = start(1, "--standin-first-token-delay", "3", "--standin-stream-chunks", "3",
                options=["--stall-timeout", "0.5", "--deep-probe-interval", "0"])
    run.wait_ready()
    status, _, body = complete(run, stream=True)
    assert status == 200 and body.rstrip().endswith(b"data: [DONE]") and b"error" not in body
    out = run.output()
    assert "rank 0 stalled: 1 request(s) in flight" in out
    assert "rank 0 ready: its token counters moved: working, back in rotation" in out
    rank = run.status()["ranks"][0]
    assert "hung" not in out and rank["state"] == "ready" and rank["attempt"] == 0 and rank["restarts"] == 0


def test_a_client_that_stops_reading_is_not_taken_for_a_stalled_rank(start):
    run = start(1, "--standin-stream-chunks", "400", "--standin-stream-pad", "65536",
                options=["--stall-timeout", "0.3", "--deep-probe-interval", "0"])
    run.wait_ready()
    import socket
    import time
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
