"""Kills the ranks' process groups when the supervisor dies without doing it itself.

Run as `python -I -S guardian.py` in its own session, reading a pipe from the supervisor:
"+PGID" registers a rank's process group, "-PGID" forgets it (its tree is verified gone),
"file PATH" a shared-memory file and "dir PATH" the supervisor's run directory, both removed
after the groups are dead. End of file means the supervisor is gone (exited, or SIGKILLed: the
kernel closes its end), so every group still registered gets SIGTERM, then SIGKILL. The
parent-death signal only reaches the API servers; this is what reaches their engine processes,
which would otherwise keep the GPU's memory.

Standard library only, nothing imported from the package: it must start fast and never fail.
"""

import os
import shutil
import signal
import sys
import time

TERM_GRACE_S = 1.5  # the supervisor's dying must not cost the ranks more than ~2 s
GROUPS_DIE_S = 5.0


def main() -> int:
    # It ends only on end of file: a Ctrl-C or a stray signal must not leave the ranks unguarded.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    groups: set[int] = set()
    files: set[str] = set()
    dirs: set[str] = set()
    for raw in sys.stdin.buffer:
        line = raw.decode(errors="replace").rstrip("\n")
        if line.startswith("file "):
            files.add(line[5:])
        elif line.startswith("dir "):
            dirs.add(line[4:])
        elif line[:1] in "+-" and line[1:].isdigit():
            (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
    # SIGTERM first: vLLM's engines shut down in about a second, and multiprocessing's resource
    # tracker (which ignores SIGTERM) then sees its users gone and unlinks the semaphores and
    # segments only it knows about. What is left after TERM_GRACE_S gets SIGKILL.
    groups = _signal_and_wait(groups, signal.SIGTERM, TERM_GRACE_S)
    _signal_and_wait(groups, signal.SIGKILL, GROUPS_DIE_S)
    for path in files:
        if path.startswith("/dev/shm/"):
            try:
                os.unlink(path)
            except OSError:
                pass
    for path in dirs:
        shutil.rmtree(path, ignore_errors=True)
    return 0


def _signal_and_wait(groups: set[int], sig: int, timeout: float) -> set[int]:
    """Signal every group; return those still there after `timeout` s."""
    for pgid in groups:
        for s in (sig, signal.SIGCONT):
            try:
                os.killpg(pgid, s)
            except OSError:
                pass
    deadline = time.monotonic() + timeout
    while groups and time.monotonic() < deadline:
        time.sleep(0.02)
        groups = {g for g in groups if _group_exists(g)}
    return groups


def _group_exists(pgid: int) -> bool:
    """True while a live (non-zombie) process is in the group. Once the supervisor is gone,
    zombies wait for whoever adopted them to reap them; they hold no memory."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


if __name__ == "__main__":
    sys.exit(main())
