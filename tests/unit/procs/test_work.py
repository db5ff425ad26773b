"""procs/work.py on real processes: the engine's CPU is its server's descendants' (the server's
own left out), or the server's when it has none; a stopped engine's does not move."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from harness import wait_for

from vllm_dp_supervisor.procs import linux, work

SPIN = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end: pass"


def used_over(pid: int, seconds: float) -> float:
    before = work.reading(pid)[0]
    time.sleep(seconds)  # a measurement window, not a wait for a condition
    after = work.reading(pid)[0]
    assert before is not None and after is not None
    return after - before


def test_the_engine_is_the_servers_descendants_and_a_stopped_one_uses_nothing():
    # the "server" sleeps; its child, the "engine", spins
    server = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time\n"
                               f"subprocess.Popen([sys.executable, '-c', {SPIN!r}])\ntime.sleep(60)"])
    engine = -1
    try:
        wait_for(lambda: linux.descendants(server.pid), 10, "the engine process")
        engine = linux.descendants(server.pid)[0]
        assert used_over(server.pid, 0.5) > 0.2 and not work.reading(server.pid)[1]  # the engine spins
        os.kill(engine, signal.SIGSTOP)
        wait_for(lambda: linux.stat_fields(engine) and linux.stat_fields(engine)[0] == "T", 5, "the engine stopped")
        assert used_over(server.pid, 0.5) == 0.0 and work.reading(server.pid)[1]  # stopped: state T
    finally:
        for pid in linux.descendants(server.pid):
            os.kill(pid, signal.SIGKILL)
        server.kill()
        server.wait()
    wait_for(lambda: linux.is_zombie(engine), 5, "the engine gone")
    assert work.reading(server.pid) == (None, False) and work.reading(None) == (None, False)


def test_a_server_without_descendants_is_its_own_engine():
    server = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        assert used_over(server.pid, 0.5) > 0.2
    finally:
        server.kill()
        server.wait()


def test_a_tracer_s_stop_is_not_a_stopped_engine(monkeypatch):
    """py-spy and strace stop a healthy engine's processes (state t) briefly and often."""
    states = {1: "S", 2: "t"}
    monkeypatch.setattr(linux, "descendants", lambda pid: [2])
    monkeypatch.setattr(linux, "stat_fields", lambda pid: [states[pid]] + ["0"] * 20)
    assert work.reading(1) == (0.0, False)
    states[2] = "T"
    assert work.reading(1) == (0.0, True)
