"""Kills the ranks' process groups when the supervisor dies without doing it itself.

Run as `python -I -S guardian.py` in its own session, reading a pipe from the supervisor:
"+PGID" registers a rank's process group, "-PGID" forgets it (its tree is verified gone),
"file PATH" a shared-memory file and "dir PATH" the supervisor's run directory, both removed
after the groups are dead. End of file means the supervisor is gone (exited, or SIGKILLed: the
kernel closes its end), so every group still registered gets SIGKILL. The parent-death signal only reaches the API servers;
this is what reaches their engine processes, which would otherwise keep the GPU's memory.

Standard library only, nothing imported from the package: it must start fast and never fail.
"""

import os
import shutil
import signal
import sys
import time

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
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    # The files are only safe to remove once nothing of the groups maps them.
    deadline = time.monotonic() + GROUPS_DIE_S
    while groups and time.monotonic() < deadline:
        groups = {g for g in groups if _group_exists(g)}
        time.sleep(0.02)
    for path in files:
        if path.startswith("/dev/shm/"):
            try:
                os.unlink(path)
            except OSError:
                pass
    for path in dirs:
        shutil.rmtree(path, ignore_errors=True)
    return 0


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except OSError:
        return True


if __name__ == "__main__":
    sys.exit(main())
