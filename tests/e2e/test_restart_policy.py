"""Restart policies over the stand-in: limits, backoff, one rank or the dp group, stop during backoff."""

from __future__ import annotations

import os
import re
import signal

import psutil
from harness import FAST, metrics, wait_for


def tree(pid: int) -> list[psutil.Process]:
    proc = psutil.Process(pid)
    return [proc, *proc.children(recursive=True)]


def test_crash_loop_gets_exactly_n_restarts_with_growing_delays_then_stops(start):
    run = start(2, "--standin-crash-after", "0.2", "--standin-crash-code", "9", "--standin-ranks", "1",
                options=["--restart-policy", "on-failure", "--max-restarts", "3", "--restart-backoff", "0.2"])
    assert run.wait_exit(30) == 9, run.output()[-4000:]
    out = run.output()
    delays = [float(d) for d in re.findall(r"rank 1 backoff: restarting in ([\d.]+) s", out)]
    assert len(delays) == 3
    # 0.2 s doubling, +-25 % jitter: the ranges do not overlap, so each wait is longer
    assert delays == sorted(delays) and 0.1 <= delays[0] <= 0.3 and 0.6 <= delays[2] <= 1.0, delays
    assert "rank 1 starting: attempt 3" in out and "attempt 4" not in out
    assert "exiting with code 9: rank 1 exited with code 9; restart limit reached (3 within 600 s)" in out
    assert re.search(r"\b1\s+\d+\s+\d+\s+9\s+[\d.]+s\s+3\s+exited with code 9", out), out


def test_one_failure_restarts_only_that_rank_while_the_others_serve(start):
    run = start(2, options=[*FAST, "--min-ready-ranks", "1", "--restart-backoff", "1"])
    status = run.wait_ready()
    keep, victim = status["ranks"][0]["pid"], status["ranks"][1]["pid"]
    victim_tree = tree(victim)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: run.status()["ranks"][1]["state"] == "backoff", 5, "rank 1 in backoff")
    assert run.get("/ready")[0] == 200  # one ready rank is enough with --min-ready-ranks 1
    assert run.get("/ready/1")[0] == 503 and run.get("/ready/0")[0] == 200
    rank1 = run.status()["ranks"][1]
    assert rank1["restarts"] == 1 and rank1["next_restart_at"] is not None
    assert not any(p.is_running() for p in victim_tree)  # the old tree is gone before the new one
    wait_for(lambda: run.get("/ready/1")[0] == 200, 10, "rank 1 back")
    after = run.status()["ranks"]
    assert after[0]["pid"] == keep and after[1]["pid"] != victim
    assert after[1]["attempt"] == 1 and after[1]["state"] == "ready"
    m = metrics(run)
    assert m[("supervisor_rank_restarts_total", (("rank", "1"),))] == 1
    assert m[("supervisor_rank_restarts_total", (("rank", "0"),))] == 0
    assert run.status()["ranks"][1]["log_dir"].endswith("attempt_1/rank_1")
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


def test_by_default_a_killed_rank_restarts_while_the_pod_stays_ready_on_the_other(start):
    run = start(2, options=[*FAST, "--restart-backoff", "2"])
    status = run.wait_ready()
    os.kill(status["ranks"][0]["pid"], signal.SIGKILL)
    wait_for(lambda: run.status()["ranks"][0]["state"] == "backoff", 5, "backoff")
    # half the ranks are ready: the pod stays in its Service, and says which rank is not
    assert run.get("/ready") == (200, {"ready": True, "not_ready": [{"rank": 0, "state": "backoff"}]})
    wait_for(lambda: run.status()["ranks"][0]["state"] == "ready", 10, "rank 0 ready again after the restart")
    assert run.get("/ready") == (200, {"ready": True}) and run.status()["ranks"][0]["restarts"] == 1
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


def test_with_every_rank_required_the_pod_is_unready_while_one_is_down(start):
    run = start(2, options=[*FAST, "--restart-backoff", "2", "--min-ready-ranks", "2"])
    status = run.wait_ready()
    os.kill(status["ranks"][0]["pid"], signal.SIGKILL)
    wait_for(lambda: run.status()["ranks"][0]["state"] == "backoff", 5, "backoff")
    code, body = run.get("/ready")
    assert code == 503 and {"rank": 0, "state": "backoff"} in body["not_ready"]
    wait_for(lambda: run.all_ready(), 10, "ready again after the restart")
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


def test_sigstopped_rank_is_caught_replaced_and_leaves_nothing(start):
    run = start(1, options=[*FAST, "--probe-interval", "0.2", "--probe-timeout", "0.3",
                            "--failure-threshold", "2", "--stop-timeout", "1"])
    status = run.wait_ready()
    hung = tree(status["ranks"][0]["pid"])
    os.kill(hung[0].pid, signal.SIGSTOP)
    wait_for(lambda: run.status()["ranks"][0]["attempt"] == 1 and run.status()["ranks"][0]["state"] == "ready",
             15, "the hung rank replaced by a ready one")
    assert not any(p.is_running() for p in hung)
    out = run.output()
    assert "rank 0 unhealthy: 2 probes failed in a row (last: no answer in 0.3 s)" in out
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


def test_exit_code_2_is_not_retried_under_on_failure(start):
    run = start(2, "--standin-crash-after", "0.3", "--standin-crash-code", "2", "--standin-ranks", "0",
                options=FAST)
    assert run.wait_exit(15) == 6  # a rank's 2 is not the supervisor's "bad configuration"
    out = run.output()
    assert "exit code 2 is not retried (--no-restart-exit-codes)" in out and "backoff" not in out


def test_always_retries_every_code(start):
    run = start(1, "--standin-crash-after", "0.3", "--standin-crash-code", "2",
                options=["--restart-policy", "always", "--restart-backoff", "0.1", "--max-restarts", "1"])
    assert run.wait_exit(15) == 6, run.output()[-4000:]
    assert "rank 0 starting: attempt 1" in run.output()


def test_stop_during_backoff_leaves_nothing_and_exits_zero(start):
    run = start(2, options=[*FAST, "--restart-backoff", "30"])
    status = run.wait_ready()
    os.kill(status["ranks"][1]["pid"], signal.SIGKILL)
    wait_for(lambda: run.status()["ranks"][1]["state"] == "backoff", 5, "backoff")
    run.send(signal.SIGTERM)
    assert run.wait_exit(10) == 0, run.output()[-4000:]
    assert "rank 1 exited: not restarted: the supervisor is stopping" in run.output()


def test_dp_mode_restarts_the_whole_local_group(start):
    run = start(2, options=[*FAST, "--mode", "dp"])
    status = run.wait_ready()
    before = [r["pid"] for r in status["ranks"]]
    os.kill(before[1], signal.SIGKILL)
    wait_for(lambda: all(r["attempt"] == 1 and r["state"] == "ready" for r in run.status()["ranks"]), 15,
             "both ranks restarted")
    after = [r["pid"] for r in run.status()["ranks"]]
    assert not set(before) & set(after)
    assert not any(psutil.pid_exists(p) for p in before)
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


def test_a_dp_group_has_one_restart_budget(start):
    """Ranks failing in turn once got --max-restarts each: a group of 8 could restart 24 times."""
    run = start(2, options=[*FAST, "--mode", "dp", "--max-restarts", "2"])
    for attempt, victim in enumerate((0, 1, 0)):
        status = run.wait_ready()
        assert all(r["attempt"] == attempt for r in status["ranks"])
        os.kill(status["ranks"][victim]["pid"], signal.SIGKILL)
        if attempt < 2:
            wait_for(lambda n=attempt + 1: all(r["attempt"] == n for r in run.status()["ranks"]), 15,
                     "the group restarted")
    assert run.wait_exit() == 137, run.output()[-4000:]
    assert "restart limit reached (2 within" in run.output()
