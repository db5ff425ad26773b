"""Kills the ranks' process groups when the supervisor dies without doing it itself.

Run as `python -I -S guardian.py` in its own session, reading a pipe from the supervisor:
"+PGID" registers a rank's process group, "-PGID" forgets it (its tree is verified gone).
End of file means the supervisor is gone (exited, or SIGKILLed: the kernel closes its end), so
every group still registered gets SIGKILL. The parent-death signal only reaches the API servers;
this is what reaches their engine processes, which would otherwise keep the GPU's memory.

Standard library only, nothing imported from the package: it must start fast and never fail.
"""

import os
import signal
import sys


def main() -> int:
    # It ends only on end of file: a Ctrl-C or a stray signal must not leave the ranks unguarded.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    groups: set[int] = set()
    for line in sys.stdin.buffer:
        line = line.strip()
        try:
            pgid = int(line[1:])
        except ValueError:
            continue
        if line.startswith(b"+"):
            groups.add(pgid)
        elif line.startswith(b"-"):
            groups.discard(pgid)
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
