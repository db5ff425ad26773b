"""Planned changes of a rank lose no request: an operator's restart and a rollout drain a rank
(the router sends it nothing new; what it holds finishes) before it is stopped. Under steady
streamed and plain load through the router, the clients see no failure; a rollout keeps the pod
ready, answers 409 to a second one, and stops, saying why, at a rank that does not come back."""

from __future__ import annotations

import contextlib
import os
import threading

from harness import post, wait_for
from load import Load

TOKEN = "planned-restart-t0ken"
SLOW_STREAMS = ("--standin-stream-chunks", "6", "--standin-stream-delay", "0.1", "--standin-completion-delay", "0.3")


def admin(tmp_path) -> list[str]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    return ["--admin-token-file", str(token_file), "--restart-policy", "on-failure"]


class ReadyWatch:
    """Polls /ready in a thread; every answer that was not 200 is kept."""
    def __init__(self, run) -> None:
        self.run = run
        self.not_ready: list[int] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> ReadyWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            code = self.run.get("/ready")[0]
            self.polls += 1
            if code != 200:
                self.not_ready.append(code)


def test_an_operator_restart_under_load_drains_the_rank_and_loses_nothing(start, tmp_path):
    run = start(2, *SLOW_STREAMS, options=admin(tmp_path))
    status = run.wait_ready()
    with Load(run.router_port, clients=4) as load:
        wait_for(lambda: load.answered_by["1"] >= 4 and load.answered_by["0"] >= 4, 30, "traffic on both ranks")
        wait_for(lambda: run.status()["ranks"][1]["inflight"] > 0, 10, "requests in flight on rank 1")
        assert post(run, "/ranks/1/restart", TOKEN)[0] == 200
        wait_for(lambda: run.status()["ranks"][1]["attempt"] == 1 and run.get("/ready/1")[0] == 200, 30,
                 "rank 1 back")
        before = load.answered_by["1"]
        wait_for(lambda: load.answered_by["1"] > before, 20, "rank 1 to answer again")
    assert load.failures() == {}, load.errors
    assert run.status()["ranks"][1]["pid"] != status["ranks"][1]["pid"]
    out = run.output()
    assert "rank 1 draining: a planned restart" in out
    assert "ranks [1] drained in" in out and "still in flight" not in out


def test_a_rollout_restarts_every_rank_in_turn_keeps_the_pod_ready_and_loses_nothing(start, tmp_path):
    run = start(3, *SLOW_STREAMS, options=admin(tmp_path))
    run.wait_ready()
    with ReadyWatch(run) as ready, Load(run.router_port, clients=4) as load:
        wait_for(lambda: load.total >= 10, 30, "traffic")
        code, body = post(run, "/rollout", TOKEN)
        assert (code, body) == (200, {"rollout": "started", "groups": [[0], [1], [2]]})
        code, body = post(run, "/rollout", TOKEN)
        assert code == 409 and "under way" in body["error"]
        assert run.status()["rollout"]["state"] == "running"
        assert run.status()["min_ready_ranks"] == 2  # the default, half rounded up: one rank may be away
        wait_for(lambda: run.status()["rollout"]["state"] != "running", 90, "the rollout to end")
        total = load.total
        wait_for(lambda: load.total > total + 5, 20, "traffic after the rollout")
    status = run.status()
    assert status["rollout"]["state"] == "done" and status["rollout"]["done"] == [0, 1, 2], status["rollout"]
    assert [r["attempt"] for r in status["ranks"]] == [1, 1, 1] and status["min_ready_ranks"] == 2
    assert load.failures() == {}, load.errors
    assert ready.not_ready == [] and ready.polls > 20
    assert "rollout done: every rank restarted and ready" in run.output()
    assert post(run, "/rollout", TOKEN)[0] == 200  # another may start once that one ended


def test_a_rollout_stops_at_a_rank_that_does_not_come_back_and_says_why(start, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    run = start(2, "--standin-exit-if-restarted", str(marks), options=[*admin(tmp_path), "--max-restarts", "0"])
    run.wait_ready()
    assert post(run, "/rollout", TOKEN)[0] == 200
    wait_for(lambda: run.status()["rollout"]["state"] != "running", 60, "the rollout to end")
    rollout = run.status()["rollout"]
    assert rollout["state"] == "failed" and rollout["done"] == [], rollout
    assert rollout["why"].startswith("rank 0 did not come back: rank 0 exited with code 2"), rollout
    # the log line is written by the console's thread: it may land a moment after /status says so
    wait_for(lambda: "rollout stopped: rank 0 did not come back" in run.output(), 10, "the log line")
    assert run.wait_exit(30) == 6  # --max-restarts 0: the failed rank (its exit 2) ends the pod, as any failure does


def test_restarts_leave_only_the_current_attempts_log_files_open(start, tmp_path):
    """Each attempt writes its own log files; an old attempt's are closed once its tree is gone
    (they were kept open until the pod stopped: two descriptors leaked per restart)."""
    run = start(2, options=admin(tmp_path))
    run.wait_ready()
    for attempt in range(1, 4):
        assert post(run, "/ranks/0/restart", TOKEN)[0] == 200
        wait_for(lambda a=attempt: run.status()["ranks"][0]["attempt"] == a and run.all_ready(), 20,
                 "rank 0 back")

    def open_logs() -> list[str]:
        fd_dir = f"/proc/{run.pid}/fd"
        targets = []
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                targets.append(os.readlink(f"{fd_dir}/{fd}"))
        return sorted(t for t in targets if t.endswith((".log",)) and "/rank_" in t)

    wait_for(lambda: len(open_logs()) == 4, 10, "only the current attempts' logs open")
    assert all("attempt_3/rank_0" in t or "attempt_0/rank_1" in t for t in open_logs()), open_logs()
