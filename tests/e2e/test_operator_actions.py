"""The operator actions behind the admin token: drain, undrain, restart a rank, stop."""

from __future__ import annotations

import json
import signal
import urllib.request

import psutil
import pytest
from harness import post, wait_for

TOKEN = "s3cret-admin-t0ken"


def test_admin_routes_do_not_exist_without_a_token(start):
    run = start(1)
    run.wait_ready()
    for path in ("/drain", "/undrain", "/stop", "/ranks/0/restart"):
        assert post(run, path, TOKEN)[0] == 404
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


def test_admin_actions_need_the_right_token_and_do_what_they_say(start, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    # rank 0 ignores SIGTERM: the stop takes --stop-timeout, long enough to be refused actions in
    run = start(2, "--standin-ignore-sigterm", "--standin-ranks", "0",
                options=["--admin-token-file", str(token_file), "--stop-timeout", "600"])
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
    wait_for(lambda: run.status()["ranks"][1]["pid"] != old and run.all_ready(), 10,
             "rank 1 replaced")
    assert run.status()["ranks"][1]["restarts"] == 1 and not psutil.pid_exists(old)
    assert post(run, "/ranks/2/restart", TOKEN)[0] == 404
    assert post(run, "/ranks/x/restart", TOKEN)[0] == 400

    assert post(run, "/stop", TOKEN) == (200, {"stopping": True})
    assert post(run, "/drain", TOKEN)[0] == 409  # every action is refused once a stop is under way
    assert post(run, "/stop", TOKEN)[0] == 409
    assert post(run, "/ranks/0/restart", TOKEN)[0] == 409
    run.send(signal.SIGTERM)  # a second stop kills at once
    assert run.wait_exit(60) == 0, run.output()[-4000:]
    assert "POST /stop by an operator" in run.output()
    assert TOKEN not in run.output() and TOKEN not in json.dumps(status)


def test_token_from_environment_and_never_in_errors(start):
    run = start(1, env={"SUPERVISOR_ADMIN_TOKEN": TOKEN})
    old = run.wait_ready()["ranks"][0]["pid"]
    assert post(run, "/ranks/0/restart", TOKEN)[0] == 200
    wait_for(lambda: run.status()["ranks"][0]["pid"] != old and run.all_ready(), 10, "restarted")
    rank_env = psutil.Process(run.status()["ranks"][0]["pid"]).environ()
    assert "SUPERVISOR_ADMIN_TOKEN" not in rank_env and "STANDIN_TEST_TAG" in rank_env  # ranks never see it
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


@pytest.mark.parametrize("args,message", [
    (["--admin-token", "has space"], "--admin-token: must be non-empty"),
    (["--admin-token-file", "/nonexistent/token"], "--admin-token-file /nonexistent/token"),
    (["--min-ready-ranks", "3"], "--min-ready-ranks 3 is more than the 2 rank(s)"),
    (["--restart-policy", "sometimes"], "one of never, on-failure, always"),
    (["--no-restart-exit-codes", "2,300"], "exit codes are 0-255"),
])
def test_bad_fault_tolerance_options(args, message, base_env):
    import subprocess

    from harness import STANDIN_CMD, SUPERVISOR
    result = subprocess.run([*SUPERVISOR, "--dp-size-local", "2",
                             "--server-cmd", STANDIN_CMD, *args],
                            env=base_env, cwd="/", capture_output=True, text=True, timeout=15)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "has space" not in result.stderr
