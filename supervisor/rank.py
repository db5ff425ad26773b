"""One rank's process tree: spawn it, wait for it, signal it, kill every process of it.

The server is started in a process group of its own (its own session), so one signal reaches the
API server and the engine processes it forks; it gets SIGKILL if the supervisor dies. The
`TreeGuard` covers the engines in that last case: they do not get the parent-death signal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import psutil

from . import linux
from .config import ENV_PREFIX
from .plan import RankSpec

log = logging.getLogger("supervisor")


def child_environment(base: Mapping[str, str], spec: RankSpec) -> dict[str, str]:
    """The supervisor's environment without its own settings, plus the rank's."""
    env = {k: v for k, v in base.items() if not k.startswith(ENV_PREFIX)}
    env.update(spec.env)
    return env


class RankProcess:
    """A running instance of a `RankSpec`."""

    def __init__(self, spec: RankSpec, base_env: Mapping[str, str]) -> None:
        self.spec = spec
        self._env = child_environment(base_env, spec)
        self._proc: asyncio.subprocess.Process | None = None
        # Descendants seen while the server lived, as (pid, create_time): catches any that moved
        # out of the process group, and pid reuse cannot make us kill a stranger.
        self._known: dict[int, float] = {}
        self.started_at: float | None = None  # wall clock, for /status
        self.started_monotonic: float | None = None
        self.returncode: int | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def pgid(self) -> int | None:
        # start_new_session: the server leads its own session and process group.
        return self.pid

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            *self.spec.argv,
            env=self._env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=linux.child_setup(os.getpid()),
        )
        self.started_at = time.time()
        self.started_monotonic = time.monotonic()

    async def wait(self) -> int:
        assert self._proc is not None
        self.returncode = await self._proc.wait()
        return self.returncode

    def remember_descendants(self) -> None:
        if self.pid is None or self.returncode is not None:
            return
        try:
            for child in psutil.Process(self.pid).children(recursive=True):
                try:
                    self._known[child.pid] = child.create_time()
                except psutil.Error:
                    pass
        except psutil.Error:
            pass

    def _outsiders(self) -> list[psutil.Process]:
        """Remembered descendants still alive and no longer in the rank's process group."""
        alive = []
        for pid, created in list(self._known.items()):
            try:
                proc = psutil.Process(pid)
                if proc.create_time() != created:
                    raise psutil.NoSuchProcess(pid)
                if os.getpgid(pid) != self.pgid and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except (psutil.Error, ProcessLookupError):
                del self._known[pid]
        return alive

    def send(self, sig: int) -> None:
        """`sig` to every process of the tree."""
        if self.pgid is None:
            return
        linux.signal_group(self.pgid, sig)
        for proc in self._outsiders():
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass

    def tree_alive(self) -> bool:
        if self.pgid is None:
            return False
        return linux.group_exists(self.pgid) or bool(self._outsiders())

    def survivors(self) -> list[int]:
        """Pids of the tree still running (for messages)."""
        if self.pgid is None:
            return []
        pids = []
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == self.pgid and proc.status() != psutil.STATUS_ZOMBIE:
                    pids.append(proc.pid)
            except (psutil.Error, ProcessLookupError):
                continue
        return sorted(set(pids) | {p.pid for p in self._outsiders()})


class TreeGuard:
    """The supervisor's end of the guardian pipe (see guardian.py)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None

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

    def _write(self, text: str) -> None:
        if self._proc is None or self._proc.stdin is None:
            return
        try:
            self._proc.stdin.write(text.encode())
        except BrokenPipeError:
            log.error("the process-tree guardian is gone: ranks are not covered if the supervisor dies")

    def guard(self, pgid: int) -> None:
        self._write(f"+{pgid}\n")

    def release(self, pgid: int) -> None:
        self._write(f"-{pgid}\n")

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
