"""Outputs that stop moving: a full log volume, and a stderr nobody reads.

Once, ENOSPC on a rank's log file ended the output pump silently: the rank's pipes were no longer
read, the rank blocked in write(), and at stop closing the file raised out of the run (exit 1
instead of 0 or 137, no summary). And the supervisor's own log lines were written on the event
loop: a stderr pipe nobody read froze /ready, /live, probes and SIGTERM.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import NEVER, STANDIN_CMD, SUPERVISOR, free_ports, wait_for

from vllm_dp_supervisor.output.ranks import RETRY_S, LogFile


def full_disk_log_dir(tmp_path: Path, ranks: int) -> Path:
    """A --log-dir whose rank files all answer ENOSPC (/dev/full), for --run-id r."""
    base = tmp_path / "logs"
    for rank in range(ranks):
        d = base / "r" / "attempt_0" / f"rank_{rank}"
        d.mkdir(parents=True)
        for name in ("stdout.log", "stderr.log"):
            (d / name).symlink_to("/dev/full")
    return base


@pytest.mark.parametrize("ending,code", [("SIGTERM", 0), ("rank SIGKILLed", 137)])
def test_a_full_log_volume_changes_nothing_but_the_files(start, tmp_path, ending, code):
    logs = full_disk_log_dir(tmp_path, 2)
    run = start(2, "--standin-chatty", "5000", options=[*NEVER, "--log-dir", str(logs), "--run-id", "r"])
    status = run.wait_ready()
    # the ranks' output is still read and teed: the last of 5,000 lines of each reaches the console
    wait_for(lambda: all(f"[rank{r}] standin line 4999" in run.output() for r in (0, 1)), 20,
             "every rank line teed despite the full disk")
    if ending == "SIGTERM":
        run.send(signal.SIGTERM)
    else:
        os.kill(status["ranks"][1]["pid"], signal.SIGKILL)
    assert run.wait_exit() == code, run.output()[-4000:]
    out = run.output()
    assert out.count("cannot write") == 2, out  # once per file that was written (stdout of each rank)
    assert "No space left on device" in out and "[Errno 28]" in out
    assert f"exiting with code {code}" in out and "rank logs:" in out
    assert "Traceback" not in out


def test_a_log_file_that_fails_is_retried_and_says_what_is_missing(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="supervisor")
    now = [100.0]
    target = tmp_path / "stdout.log"
    target.symlink_to("/dev/full")
    f = LogFile(target, 1 << 20, rank=3, monotonic=lambda: now[0])
    f.write(b"a\n")
    f.write(b"b\nc\n", lines=2)  # not even tried: the retry time has not come
    target.unlink()
    now[0] += RETRY_S / 2
    f.write(b"d\n")
    assert not target.exists()
    now[0] += RETRY_S
    f.write(b"e\n")
    f.close()
    assert target.read_bytes() == b"[vllm-dp-supervisor] 4 line(s) missing here: No space left on device\ne\n"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot write" in m for m in messages) == 1
    assert any("writing" in m and "again; 4 line(s)" in m for m in messages)


def test_a_tiny_tmpfs_filling_up(start, tmp_path):
    """A real full file system, where the machine lets us mount one (root)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        run = start(1, "--standin-chatty", "5000", options=["--log-dir", str(mnt), "--run-id", "r"])
        run.wait_ready()
        wait_for(lambda: "[rank0] standin line 4999" in run.output(), 20, "every line teed")
        run.send(signal.SIGTERM)
        assert run.wait_exit() == 0, run.output()[-4000:]
        out = run.output()
        assert out.count("cannot write") == 1 and "[Errno 28]" in out
        assert "exiting with code 0" in out
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _pipe_bytes(fd: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, "little")


def _stopped_growing(fd: int) -> Callable[[], bool]:
    """True once the pipe holds most of its 64 KiB and has not grown for a second: full."""
    seen = {"bytes": -1, "since": time.monotonic()}

    def full() -> bool:
        now = _pipe_bytes(fd)
        if now != seen["bytes"]:
            seen.update(bytes=now, since=time.monotonic())
        return now > 60_000 and time.monotonic() - seen["since"] >= 1.0
    return full


def test_a_stderr_nobody_reads_freezes_nothing(tag, base_env, tmp_path, no_survivors):
    """The supervisor's own lines (here progress lines, 100 a second) into a pipe never read."""
    ports = free_ports(2)
    read_end, write_end = os.pipe()
    args = ["--dp-size-local", "1", "--port", str(ports[1]), "--supervisor-port", str(ports[0]),
            "--host", "127.0.0.1", "--server-cmd", STANDIN_CMD, "--startup-probe-interval", "0.01",
            "--progress-interval", "0.01", "--tee", "none", "--", "m", "--standin-load-seconds", "600"]
    proc = subprocess.Popen([*SUPERVISOR, *args], cwd=tmp_path, env=base_env, stdout=subprocess.DEVNULL,
                            stderr=write_end, start_new_session=True)
    os.close(write_end)
    drained: list[bytes] = []
    try:
        from harness import Http
        wait_for(_stopped_growing(read_end), 60, "the stderr pipe to fill up")
        for _ in range(20):  # the loop answers although its log lines cannot be written
            assert Http.get(ports[0], "/live", timeout=10)[0] == 200
            assert Http.get(ports[0], "/ready", timeout=10)[0] == 503  # loading
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0  # acted on; exits even though its stderr never moves
        reader = threading.Thread(target=lambda: drained.append(os.read(read_end, 1 << 20)))
        reader.start()
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(read_end)
    assert drained and b"not ready after" in drained[0]
