"""The supervisor's end of the guardian's pipe (guardian.py, a process of its own): what it must
kill and remove if the supervisor dies by SIGKILL, said as it becomes known.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

SINCE_MARGIN_S = 1.0


class TreeGuard:
    """The supervisor's end of the guardian pipe (see guardian.py). It remembers what it told
    the guardian, so that a new guardian can be told the same if the first one dies."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._said: dict[str, None] = {}  # every line the guardian must know, in order
        # Shared memory made from now on and used by no one when the ranks are dead is theirs. A
        # file's ctime comes from the kernel's coarse clock, up to a tick behind time.time(): a
        # second's margin (what multiprocessing made then and no one uses is garbage all the same).
        self._say(f"since {time.time() - SINCE_MARGIN_S:.3f}\n")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        script = Path(__file__).with_name("guardian.py")
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(script)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            start_new_session=True,  # out of reach of a Ctrl-C or a kill of our process group
            bufsize=0,
        )
        self._send("".join(self._said))

    def reap(self) -> int | None:
        """The exit status of a guardian that died (it is our child: reaped here, by pid)."""
        return None if self._proc is None else self._proc.poll()

    def _send(self, text: str) -> None:
        if not text or self._proc is None or self._proc.stdin is None:
            return
        try:
            self._proc.stdin.write(text.encode())
        except BrokenPipeError:
            pass  # it died: the supervisor's watch restarts it and tells the new one everything

    def _say(self, line: str) -> None:
        if line not in self._said:
            self._said[line] = None
            self._send(line)

    def guard(self, pgid: int) -> None:
        self._say(f"+{pgid}\n")

    def release(self, pgid: int) -> None:
        self._said.pop(f"+{pgid}\n", None)
        self._send(f"-{pgid}\n")

    def kill_tagged(self, name: str, value: str) -> None:
        """Processes whose environment holds NAME=VALUE are killed too (daemons that left their group)."""
        self._say(f"tag {name}={value}\n")

    def cleanup_files(self, paths: Iterable[str]) -> None:
        """Files to unlink (shared memory) once the groups are killed, if the supervisor dies."""
        for path in paths:
            self._say(f"file {path}\n")

    def cleanup_dir(self, path: str) -> None:
        self._say(f"dir {path}\n")

    def close(self, timeout: float = 5.0) -> None:
        if self._proc is None:
            return
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
