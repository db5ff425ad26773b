"""Kills the ranks' process groups when the supervisor dies without doing it itself.

Run as `python -I -S guardian.py` in its own session, reading a pipe from the supervisor:
"+PGID" registers a rank's process group, "-PGID" forgets it (its tree is verified gone),
"tag NAME=VALUE" the environment entry every rank process carries (so a daemon that left its
group with setsid is found all the same), "file PATH" a shared-memory file and "dir PATH" the
supervisor's run directory, both removed after the processes are dead. End of file means the
supervisor is gone (exited, or SIGKILLed: the kernel closes its end), so every group still
registered, and every tagged process, gets SIGTERM, then SIGKILL. The
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
    tags: set[bytes] = set()
    for raw in sys.stdin.buffer:
        line = raw.decode(errors="replace").rstrip("\n")
        if line.startswith("tag ") and "=" in line:
            tags.add(raw[4:].rstrip(b"\n"))
        elif line.startswith("file "):
            files.add(line[5:])
        elif line.startswith("dir "):
            dirs.add(line[4:])
        elif line[:1] in "+-" and line[1:].isdigit():
            (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
    # SIGTERM first: vLLM's engines shut down in about a second, and multiprocessing's resource
    # tracker (which ignores SIGTERM) then sees its users gone and unlinks the semaphores and
    # segments only it knows about. What is left after TERM_GRACE_S gets SIGKILL.
    groups |= {-pid for pid in _tagged(tags)}  # -pid: that process alone
    groups = _signal_and_wait(groups, signal.SIGTERM, TERM_GRACE_S)
    groups |= {-pid for pid in _tagged(tags)}  # started meanwhile
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


def _signal_and_wait(targets: set[int], sig: int, timeout: float) -> set[int]:
    """Signal every target (a process group, or -pid for one process); return those still
    there after `timeout` s."""
    for target in targets:
        for s in (sig, signal.SIGCONT):
            try:
                os.killpg(target, s) if target > 0 else os.kill(-target, s)
            except OSError:
                pass
    deadline = time.monotonic() + timeout
    while targets and time.monotonic() < deadline:
        time.sleep(0.02)
        targets = {t for t in targets if _alive(t)}
    return targets


def _processes() -> list[tuple[int, list[bytes]]]:
    """(pid, stat fields after the name) of every process."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                found.append((int(name), f.read().rsplit(b")", 1)[1].split()))
        except OSError:
            continue
    return found


def _alive(target: int) -> bool:
    """True while a live (non-zombie) process is in the group (or is the process, for -pid).
    Once the supervisor is gone, zombies wait for whoever adopted them to reap them; they hold no
    memory."""
    for pid, fields in _processes():
        if (pid == -target if target < 0 else int(fields[2]) == target) and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _tagged(tags: set[bytes]) -> list[int]:
    """Live processes whose environment holds one of `tags` (NAME=VALUE)."""
    if not tags:
        return []
    found = []
    for pid, fields in _processes():
        if pid == os.getpid() or fields[0] in (b"Z", b"X"):
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                entries = set(f.read().split(b"\0"))
        except OSError:
            continue
        if entries & tags:
            found.append(pid)
    return found


if __name__ == "__main__":
    sys.exit(main())
