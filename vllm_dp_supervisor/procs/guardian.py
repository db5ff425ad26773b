"""Kills the ranks' process groups when the supervisor dies without doing it itself.

Run as `python -I -S guardian.py` in its own session, reading a pipe from the supervisor:
"+PGID" registers a rank's process group, "-PGID" forgets it (its tree is verified gone),
"tag NAME=VALUE" the environment entry every rank process carries (so a daemon that left its
group with setsid is found all the same), "file PATH" a shared-memory file and "dir PATH" the
supervisor's run directory, both removed after the processes are dead, and "since TIME" the wall
clock the supervisor started at: the semaphores and segments (`sem.mp-*`, `psm_*`) created since
then that no process maps or holds open once the ranks are dead are removed too (a rank still
loading made some the supervisor never saw; procs/leftovers.py, the supervisor's own sweep, uses
the same function). End of file means the
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


class Told:
    """What the supervisor said, line by line, until it went away."""

    def __init__(self) -> None:
        self.groups: set[int] = set()
        self.files: set[str] = set()
        self.dirs: set[str] = set()
        self.tags: set[bytes] = set()
        self.since: float | None = None

    def take(self, raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip("\n")
        if line.startswith("tag ") and "=" in line:
            self.tags.add(raw[4:].rstrip(b"\n"))
        elif line.startswith("file "):
            self.files.add(line[5:])
        elif line.startswith("dir "):
            self.dirs.add(line[4:])
        elif line.startswith("since "):
            try:
                self.since = float(line[6:])
            except ValueError:
                pass
        elif line[:1] in "+-" and line[1:].isdigit():
            (self.groups.add if line[0] == "+" else self.groups.discard)(int(line[1:]))


def main() -> int:
    # It ends only on end of file: a Ctrl-C or a stray signal must not leave the ranks unguarded.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    told = Told()
    for raw in sys.stdin.buffer:
        told.take(raw)
    # SIGTERM first: vLLM's engines shut down in about a second, and multiprocessing's resource
    # tracker (which ignores SIGTERM) then sees its users gone and unlinks the semaphores and
    # segments only it knows about. What is left after TERM_GRACE_S gets SIGKILL.
    groups = told.groups | {-pid for pid in _tagged(told.tags)}  # -pid: that process alone
    groups = _signal_and_wait(groups, signal.SIGTERM, TERM_GRACE_S)
    groups |= {-pid for pid in _tagged(told.tags)}  # started meanwhile
    _signal_and_wait(groups, signal.SIGKILL, GROUPS_DIE_S)
    files = told.files | (unused_shared_memory(told.since) if told.since is not None else set())
    for path in files:
        if path.startswith("/dev/shm/"):
            try:
                os.unlink(path)
            except OSError:
                pass
    for path in told.dirs:
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


SHM_PREFIXES = ("sem.mp-", "psm_")


def unused_shared_memory(since: float) -> set[str]:
    """`sem.mp-*` and `psm_*` files in /dev/shm created since `since` (wall clock) that no live
    process maps or holds open. The supervisor's own sweep (procs/leftovers.py) calls this too:
    one rule, written here because this file imports nothing of the package."""
    candidates = set()
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return set()
    for name in names:
        path = "/dev/shm/" + name
        try:
            if name.startswith(SHM_PREFIXES) and os.stat(path).st_ctime >= since:
                candidates.add(path)
        except OSError:
            continue
    for pid, _ in _processes():
        if not candidates:
            break
        candidates -= _shm_used_by(pid)
    return candidates


def _shm_used_by(pid: int) -> set[str]:
    used = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            used |= {line.split(maxsplit=5)[5].strip() for line in f if "/dev/shm/" in line}
    except (OSError, IndexError):
        pass
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                used.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
    except OSError:
        pass
    return used


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
