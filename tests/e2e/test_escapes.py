"""Processes, files and signals that once escaped the supervisor's cleanup.

- A rank process that double-forks and calls setsid left a daemon outside the rank's process
  group: after SIGTERM (exit 0) it lived on under PID 1, the stop waited 2 s for its pipes, and
  'Event loop is closed' tracebacks followed the exit line.
- A SIGKILLed guardian went unnoticed, so a later SIGKILL of the supervisor left everything.
- A second SIGTERM left one /dev/shm/sem.mp-* per rank: SIGKILL reached multiprocessing's
  resource tracker, the only process that knew the name, before it could unlink it.
- SIGQUIT, SIGUSR1, SIGUSR2 and SIGALRM killed the supervisor at once, without a line.
"""

from __future__ import annotations

import os
import re
import signal

import psutil
import pytest
from harness import tagged_processes, wait_for


def daemon_pid(run, rank: int = 0) -> int:
    found = wait_for(lambda: re.search(rf"\[rank{rank}\] standin daemon (\d+)", run.output()), 10,
                     "the stand-in's daemon to start")
    pid = int(found.group(1))
    wait_for(lambda: psutil.Process(pid).ppid() == run.pid, 10, "the daemon re-parented to the supervisor")
    return pid


def gone(pid: int) -> bool:
    """Not running: no such process, or a zombie waiting for whoever adopted it."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_clean_exit(out: str) -> None:
    assert "Traceback" not in out and "Event loop is closed" not in out, out[-3000:]


def test_a_daemon_that_left_the_group_is_stopped_with_its_rank(start):
    run = start(2, "--standin-daemon-seconds", "600", "--standin-ranks", "1")
    run.wait_ready()
    daemon = daemon_pid(run, 1)
    assert os.getpgid(daemon) != run.status()["ranks"][1]["pid"]  # outside the rank's group
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]
    assert gone(daemon)
    assert_clean_exit(run.output())


def test_a_daemon_is_gone_before_its_rank_restarts(start):
    run = start(1, "--standin-daemon-seconds", "600", options=["--restart-policy", "on-failure",
                                                               "--restart-backoff", "0.1"])
    first = run.wait_ready()["ranks"][0]["pid"]
    daemon = daemon_pid(run)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: run.status()["ranks"][0]["attempt"] == 1, 20, "the rank restarted")
    assert gone(daemon)  # its tree, daemon included, was verified gone first
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


def test_a_daemon_with_no_trace_of_the_run_is_stopped_all_the_same(start):
    run = start(1, "--standin-daemon-seconds", "600", "--standin-daemon-clear-env")
    run.wait_ready()
    daemon = daemon_pid(run)
    assert "SUPERVISOR_RUN" not in psutil.Process(daemon).environ()
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]
    assert gone(daemon)
    assert "of no rank" in run.output()
    assert_clean_exit(run.output())


def test_the_guardian_kills_daemons_when_the_supervisor_is_sigkilled(start, tag):
    run = start(1, "--standin-daemon-seconds", "600")
    run.wait_ready()
    daemon = daemon_pid(run)
    run.send(signal.SIGKILL)
    wait_for(lambda: not tagged_processes(tag), 10, "every process gone, the daemon included")
    assert gone(daemon)


def guardian_of(run) -> psutil.Process:
    return next(c for c in psutil.Process(run.pid).children() if "guardian.py" in " ".join(c.cmdline()))


def test_a_killed_guardian_is_replaced_and_still_covers_the_ranks(start, tag):
    run = start(2)
    status = run.wait_ready()
    old = guardian_of(run)
    old.send_signal(signal.SIGKILL)
    wait_for(lambda: "process-tree guardian running again" in run.output(), 10, "a new guardian")
    assert f"the process-tree guardian (pid {old.pid}) killed by SIGKILL" in run.output()
    new = guardian_of(run)
    assert new.pid != old.pid and run.get("/ready")[0] == 200
    tmpdir = psutil.Process(status["ranks"][0]["pid"]).environ()["TMPDIR"]
    run.send(signal.SIGKILL)  # the new guardian must know the groups and the run directory
    wait_for(lambda: not tagged_processes(tag), 10, "every rank process gone")
    wait_for(lambda: not os.path.exists(os.path.dirname(tmpdir)), 10, "the run directory removed")


def semaphore_of(run, rank: int = 0) -> str:
    return wait_for(lambda: re.search(rf"\[rank{rank}\] standin semaphore (\S+)", run.output()), 10,
                    "the stand-in's semaphore").group(1)


def test_a_second_sigterm_leaves_no_semaphore(start):
    run = start(2, "--standin-semaphore", "--standin-ignore-sigterm", options=["--stop-timeout", "60"])
    run.wait_ready()
    sems = [semaphore_of(run, r) for r in (0, 1)]
    assert all(os.path.exists(s) for s in sems)
    run.send(signal.SIGTERM)
    wait_for(lambda: run.get("/ready")[0] == 503, 5, "the stop under way")
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]
    assert not [s for s in sems if os.path.exists(s)]


@pytest.mark.parametrize("sig", [signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF, signal.SIGPOLL,
                                 signal.SIGPWR, signal.SIGXCPU])
def test_signals_that_mean_nothing_here_are_ignored_out_loud(start, sig):
    run = start(1)
    run.wait_ready()
    run.send(sig)
    wait_for(lambda: f"ignoring {sig.name}" in run.output(), 10, f"{sig.name} to be noted")
    assert run.get("/ready")[0] == 200
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


def test_sigusr1_logs_the_status_and_sigusr2_toggles_debug(start):
    run = start(1)
    run.wait_ready()
    run.send(signal.SIGUSR1)
    wait_for(lambda: 'status (SIGUSR1): {"ready": true' in run.output(), 10, "the status in the log")
    run.send(signal.SIGUSR2)
    wait_for(lambda: "log level debug (SIGUSR2)" in run.output(), 10, "debug on")
    run.send(signal.SIGUSR2)
    wait_for(lambda: "log level info (SIGUSR2)" in run.output(), 10, "debug off")
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


def test_sigquit_stops_in_order_without_the_grace(start):
    run = start(2, "--standin-ignore-sigterm", options=["--stop-timeout", "600"])
    status = run.wait_ready()
    run.send(signal.SIGQUIT)
    assert run.wait_exit(60) == 0  # well before --stop-timeout
    out = run.output()
    assert "SIGQUIT: killing every rank now" in out and "exiting with code 0: SIGQUIT received" in out
    assert all(gone(r["pid"]) for r in status["ranks"])
