"""Restart policy, hung ranks, readiness while a rank is down, and the operator actions."""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.request

import psutil
import pytest

from conftest import wait_for

FAST = ["--restart-policy", "on-failure", "--restart-backoff", "0.1"]


def post(run, path: str, token: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{run.supervisor_port}{path}", method="POST", data=b"")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def tree(pid: int) -> list[psutil.Process]:
    proc = psutil.Process(pid)
    return [proc, *proc.children(recursive=True)]


def test_crash_loop_gets_exactly_n_restarts_with_growing_delays_then_stops(start):
    run = start(2, "--standin-crash-after", "0.2", "--standin-crash-code", "3", "--standin-ranks", "1",
                options=["--restart-policy", "on-failure", "--max-restarts", "3", "--restart-backoff", "0.2"])
    assert run.wait_exit(30) == 3
    out = run.output()
    delays = [float(d) for d in re.findall(r"rank 1 backoff: restarting in ([\d.]+) s", out)]
    assert len(delays) == 3
    # 0.2 s doubling, +-25 % jitter: the ranges do not overlap, so each wait is longer
    assert delays == sorted(delays) and 0.1 <= delays[0] <= 0.3 and 0.6 <= delays[2] <= 1.0, delays
    assert "rank 1 starting: attempt 3" in out and "attempt 4" not in out
    assert "exiting with code 3: rank 1 exited with code 3; restart limit reached (3 within 600 s)" in out
    assert re.search(r"\b1\s+\d+\s+\d+\s+3\s+[\d.]+s\s+3\s+exited with code 3", out), out


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
    from test_observability import metrics
    m = metrics(run)
    assert m[("supervisor_rank_restarts_total", (("rank", "1"),))] == 1
    assert m[("supervisor_rank_restarts_total", (("rank", "0"),))] == 0
    assert run.status()["ranks"][1]["log_dir"].endswith("attempt_1/rank_1")
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0


def test_pod_is_unready_while_a_rank_is_down_by_default(start):
    run = start(2, options=[*FAST, "--restart-backoff", "2"])
    status = run.wait_ready()
    os.kill(status["ranks"][0]["pid"], signal.SIGKILL)
    wait_for(lambda: run.status()["ranks"][0]["state"] == "backoff", 5, "backoff")
    code, body = run.get("/ready")
    assert code == 503 and {"rank": 0, "state": "backoff"} in body["not_ready"]
    wait_for(lambda: run.get("/ready")[0] == 200, 10, "ready again after the restart")
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0


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
    assert run.wait_exit() == 0


def test_exit_code_2_is_not_retried_under_on_failure(start):
    run = start(2, "--standin-crash-after", "0.3", "--standin-crash-code", "2", "--standin-ranks", "0",
                options=FAST)
    assert run.wait_exit(15) == 2
    out = run.output()
    assert "exit code 2 is not retried (--no-restart-exit-codes)" in out and "backoff" not in out


def test_always_retries_every_code(start):
    run = start(1, "--standin-crash-after", "0.3", "--standin-crash-code", "2",
                options=["--restart-policy", "always", "--restart-backoff", "0.1", "--max-restarts", "1"])
    assert run.wait_exit(15) == 2
    assert "rank 0 starting: attempt 1" in run.output()


def test_stop_during_backoff_leaves_nothing_and_exits_zero(start):
    run = start(2, options=[*FAST, "--restart-backoff", "30"])
    status = run.wait_ready()
    os.kill(status["ranks"][1]["pid"], signal.SIGKILL)
    wait_for(lambda: run.status()["ranks"][1]["state"] == "backoff", 5, "backoff")
    run.send(signal.SIGTERM)
    assert run.wait_exit(10) == 0
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
    assert run.wait_exit() == 0


def test_a_dp_group_has_one_restart_budget(start):
    """Ranks failing in turn once got --max-restarts each: a group of 8 could restart 24 times."""
    run = start(2, options=[*FAST, "--mode", "dp", "--max-restarts", "2"])
    for attempt, victim in enumerate((0, 1, 0)):
        status = run.wait_ready()
        assert all(r["attempt"] == attempt for r in status["ranks"])
        os.kill(status["ranks"][victim]["pid"], signal.SIGKILL)
        if attempt < 2:
            wait_for(lambda: all(r["attempt"] == attempt + 1 for r in run.status()["ranks"]), 15, "the group restarted")
    assert run.wait_exit() == 137
    assert "restart limit reached (2 within" in run.output()


# ---- operator actions ----

TOKEN = "s3cret-admin-t0ken"


def test_admin_routes_do_not_exist_without_a_token(start):
    run = start(1)
    run.wait_ready()
    for path in ("/drain", "/undrain", "/stop", "/ranks/0/restart"):
        assert post(run, path, TOKEN)[0] == 404
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0


def test_admin_actions_need_the_right_token_and_do_what_they_say(start, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    run = start(2, options=["--admin-token-file", str(token_file)])
    status = run.wait_ready()
    assert post(run, "/drain")[0] == 401
    assert post(run, "/drain", "wrong")[0] == 401
    assert post(run, "/drain", TOKEN[:-1])[0] == 401

    assert post(run, "/drain", TOKEN) == (200, {"draining": True, "changed": True})
    assert run.get("/ready")[0] == 503 and run.get("/ready/0")[0] == 503
    assert run.status()["draining"] is True
    port = status["ranks"][0]["port"]
    assert urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models").status == 200  # still serving
    assert post(run, "/undrain", TOKEN)[1]["draining"] is False
    assert run.get("/ready")[0] == 200

    old = status["ranks"][1]["pid"]
    assert post(run, "/ranks/1/restart", TOKEN) == (200, {"rank": 1, "restarting": True})
    wait_for(lambda: run.status()["ranks"][1]["pid"] != old and run.get("/ready")[0] == 200, 10,
             "rank 1 replaced")
    assert run.status()["ranks"][1]["restarts"] == 1 and not psutil.pid_exists(old)
    assert post(run, "/ranks/2/restart", TOKEN)[0] == 404
    assert post(run, "/ranks/x/restart", TOKEN)[0] == 400

    assert post(run, "/stop", TOKEN) == (200, {"stopping": True})
    code = post(run, "/drain", TOKEN)[0] if run.proc.poll() is None else 409
    assert code == 409
    assert run.wait_exit() == 0
    assert "POST /stop by an operator" in run.output()
    assert TOKEN not in run.output() and TOKEN not in json.dumps(status)


def test_token_from_environment_and_never_in_errors(start):
    run = start(1, env={"SUPERVISOR_ADMIN_TOKEN": TOKEN})
    old = run.wait_ready()["ranks"][0]["pid"]
    assert post(run, "/ranks/0/restart", TOKEN)[0] == 200
    wait_for(lambda: run.status()["ranks"][0]["pid"] != old and run.get("/ready")[0] == 200, 10, "restarted")
    rank_env = psutil.Process(run.status()["ranks"][0]["pid"]).environ()
    assert "SUPERVISOR_ADMIN_TOKEN" not in rank_env and "STANDIN_TEST_TAG" in rank_env  # ranks never see it
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0


@pytest.mark.parametrize("args,message", [
    (["--admin-token", "has space"], "--admin-token: must be non-empty"),
    (["--admin-token-file", "/nonexistent/token"], "--admin-token-file /nonexistent/token"),
    (["--min-ready-ranks", "3"], "--min-ready-ranks 3 is more than the 2 rank(s)"),
    (["--restart-policy", "sometimes"], "one of never, on-failure, always"),
    (["--no-restart-exit-codes", "2,300"], "exit codes are 0-255"),
])
def test_bad_fault_tolerance_options(args, message, base_env):
    import subprocess
    import sys
    from conftest import STANDIN_CMD, SUPERVISOR
    result = subprocess.run([*SUPERVISOR, "--dp-size-local", "2",
                             "--server-cmd", STANDIN_CMD, *args],
                            env=base_env, cwd="/", capture_output=True, text=True, timeout=15)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "has space" not in result.stderr


# ---- hung engines behind a healthy /health ----

DEEP = ["--deep-probe-interval", "0.2", "--deep-probe-timeout", "0.3", "--failure-threshold", "2",
        "--probe-interval", "0.2"]


def test_deep_probe_catches_an_engine_hung_behind_a_healthy_health(start):
    run = start(2, "--standin-hang-completions-after", "0.5", "--standin-ranks", "1", options=DEEP)
    run.wait_ready()
    assert run.wait_exit(15) == 1
    out = run.output()
    assert "rank 1 hung: 2 one-token completions failed in a row (last: no answer in 0.3 s) while /health answered" \
        in out
    assert "rank 0 hung" not in out


def test_deep_probe_hang_is_replaced_under_a_restart_policy(start):
    run = start(1, "--standin-hang-completions-after", "0.5", options=[*DEEP, *FAST])
    first = run.wait_ready()["ranks"][0]["pid"]
    wait_for(lambda: run.status()["ranks"][0]["attempt"] >= 1 and run.status()["ranks"][0]["state"] == "ready",
             15, "the hung rank replaced")
    assert not psutil.pid_exists(first)
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0


def standin_metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    return float(next(l for l in text.splitlines() if l.startswith(name)).rsplit(" ", 1)[1])


def test_deep_probe_is_skipped_while_tokens_flow(start):
    # completions would hang, but the token counters move: the engine is busy, not stuck
    run = start(1, "--standin-hang-completions-after", "0", "--standin-busy", options=DEEP)
    port = run.wait_ready()["ranks"][0]["port"]
    # each deep-probe round reads the counters (+100 a read): wait for eight rounds
    wait_for(lambda: standin_metric(port, "vllm:generation_tokens_total") >= 900, 10, "eight deep-probe rounds")
    assert run.status()["ranks"][0]["state"] == "ready"
    assert standin_metric(port, "standin_completions_total") == 0  # not one completion was sent
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0


def test_deep_probe_off(start):
    from test_observability import metrics
    run = start(1, "--standin-hang-completions-after", "0", options=[*DEEP[2:], "--deep-probe-interval", "0"])
    port = run.wait_ready()["ranks"][0]["port"]
    wait_for(lambda: metrics(run)[("supervisor_probe_duration_seconds_count", (("rank", "0"),))] >= 10, 10,
             "two seconds of /health probes (ten deep-probe intervals, were they on)")
    assert run.status()["ranks"][0]["state"] == "ready"
    assert standin_metric(port, "standin_completions_total") == 0
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0


# ---- vLLM's in-engine recovery (--enable-fault-tolerance) ----

FT = ["--mode", "dp", "--probe-interval", "0.2"]
FT_ARGS = ("--enable-fault-tolerance", "--standin-ft-fault-after", "1", "--standin-ranks", "1")


def test_faulted_engine_is_recovered_in_place_and_the_group_is_unready_meanwhile(start):
    run = start(2, *FT_ARGS, options=FT)
    pids = [r["pid"] for r in run.wait_ready()["ranks"]]
    code, body = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(run.get("/ready")), 5, "unready")
    assert body["not_ready"] == [{"rank": 0, "state": "recovering"}, {"rank": 1, "state": "recovering"}]
    wait_for(lambda: run.get("/ready")[0] == 200, 5, "ready again after the retry")
    assert [r["pid"] for r in run.status()["ranks"]] == pids  # recovered, not restarted
    assert "[rank1] standin: fault tolerance retry received (engine unhealthy)" in run.output()
    assert "[rank0] standin: fault tolerance retry received (engine healthy)" in run.output()  # every rank
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0
    assert "rank 1: in-engine recovery done; group [0, 1] ready again" in run.output()


@pytest.mark.parametrize("variant,why", [
    (["--standin-ft-recovery", "fails"], "in-engine recovery failed (rank 1: collective op failed during retry)"),
    (["--standin-ft-recovery", "hangs"], "in-engine recovery failed (not healthy 1 s after the retry"),
    (["--standin-ft-dead"], "in-engine recovery failed (an engine is dead, not recoverable)"),
])
def test_failed_recovery_falls_back_to_restarting_the_group(start, variant, why):
    run = start(2, *FT_ARGS, *variant, options=[*FT, *FAST, "--ft-recovery-timeout", "1"])
    pids = [r["pid"] for r in run.wait_ready()["ranks"]]
    wait_for(lambda: all(r["attempt"] == 1 and r["state"] == "ready" for r in run.status()["ranks"]), 15,
             "the group restarted")
    assert not set(pids) & {r["pid"] for r in run.status()["ranks"]}
    assert why in run.output()
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0


def test_failed_recovery_without_a_restart_policy_stops_the_pod(start):
    run = start(2, *FT_ARGS, "--standin-ft-dead", options=FT)
    run.wait_ready()
    assert run.wait_exit(10) == 1
    assert "exiting with code 1: rank 1: in-engine recovery failed (an engine is dead" in run.output()
