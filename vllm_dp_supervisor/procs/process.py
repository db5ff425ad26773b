"""One rank's process tree: spawn it, wait for it, signal it, kill every process of it.

The server is started in a process group of its own (its own session), so one signal reaches the
API server and the engine processes it forks; it gets SIGKILL if the supervisor dies. The
guardian (guard.py) covers the engines in that last case: they do not get the parent-death signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from typing import Any

import psutil

from vllm_dp_supervisor.output.ranks import RankOutput
from vllm_dp_supervisor.procs import linux
from vllm_dp_supervisor.settings.config import ENV_PREFIX, DeviceKind
from vllm_dp_supervisor.settings.plan import RANK_ENV, RUN_ENV, RankSpec

log = logging.getLogger("supervisor")
PROGRESS_CPU_S = 0.05  # CPU time a start must use between two samples to count as progress
STREAM_LIMIT = 2 ** 16  # asyncio's default buffer for a subprocess's pipe


def child_environment(base: Mapping[str, str], spec: RankSpec) -> dict[str, str]:
    """The supervisor's environment without its own settings, plus the rank's."""
    env = {k: v for k, v in base.items() if not k.startswith(ENV_PREFIX)}
    env.update(spec.env)
    return env


# (run tag, rank) from the environment of processes re-parented to the supervisor, read once per
# process (its environment is fixed at exec): teardown polls every rank's tree every 20 ms, and
# every other rank's server is a child of the supervisor too. Keyed by (pid, start time).
_TAGS: dict[tuple[int, int | None], tuple[str | None, str | None]] = {}
_TAGS_KEPT = 4096


def _run_tag_of(pid: int) -> tuple[str | None, str | None]:
    key = (pid, linux.start_time(pid))
    if key not in _TAGS:
        if len(_TAGS) >= _TAGS_KEPT:
            _TAGS.clear()
        env = linux.environ_of(pid)
        _TAGS[key] = (env.get(RUN_ENV), env.get(RANK_ENV))
    return _TAGS[key]


async def _reader_of(pipe: Any) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    """A stream on the event loop over one of a child's output pipes."""
    reader = asyncio.StreamReader(limit=STREAM_LIMIT)
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(lambda: protocol, pipe)
    return reader, transport


class RankProcess:
    """A running instance of a `RankSpec`."""

    def __init__(self, spec: RankSpec, base_env: Mapping[str, str], output: RankOutput | None = None) -> None:
        self.spec = spec
        self._env = child_environment(base_env, spec)
        self._proc: subprocess.Popen | None = None
        self.output = output if output is not None else RankOutput(spec.rank, None)
        self._pumps: list[asyncio.Task] = []
        self._pipes: list[asyncio.BaseTransport] = []
        # /dev/shm segments the tree had mapped: unlinked once the tree is gone (a SIGKILLed
        # vLLM leaves ~400 MiB per rank there otherwise).
        self.shm_paths: set[str] = set()
        # while it starts: what /status says of its progress (sample_start)
        self.starting_readout: dict[str, Any] | None = None
        self._progress: tuple[float, int] | None = None  # CPU seconds, output lines: at the last progress
        self._progress_at = 0.0  # monotonic, when progress was last seen
        # Descendants seen while the server lived, as (pid, create_time): catches any that moved
        # out of the process group, and pid reuse cannot make us kill a stranger.
        self._known: dict[int, float] = {}
        self._tag = spec.env.get(RUN_ENV)
        self.started_at: float | None = None  # wall clock, for /status
        self.started_monotonic: float | None = None
        self.returncode: int | None = None
        self.exited_at: float | None = None  # wall clock, the moment its exit was seen
        self._oom_kills_at_start: int | None = None  # the cgroup's OOM kills before it started

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def sample_start(self) -> dict[str, Any] | None:
        """While the rank starts: its tree's CPU time, its output lines, and what its server waits
        on in the kernel, with how long neither the CPU time nor the output has moved (a start
        that cannot start: seen, a new server asleep in sched_setaffinity for minutes). Reads
        /proc: call it off the event loop."""
        pid = self.pid
        if pid is None:
            return None
        try:
            server = psutil.Process(pid)
            cpu = 0.0
            for proc in (server, *server.children(recursive=True)):
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    cpu += times.user + times.system
        except psutil.Error:
            return None
        wait = linux.kernel_wait(pid)
        now, lines = time.monotonic(), self.output.lines_seen
        if self._progress is None or cpu - self._progress[0] >= PROGRESS_CPU_S or lines != self._progress[1]:
            self._progress, self._progress_at = (cpu, lines), now
        self.starting_readout = {"cpu_s": round(cpu, 2), "output_lines": lines,
                                 "state": None if wait is None else wait[0],
                                 "wchan": None if wait is None else wait[1] or None,
                                 "no_progress_for_s": round(now - self._progress_at, 1)}
        return self.starting_readout

    def _place_on_its_cores(self) -> None:
        """A CPU rank runs on the cores it is given from its first instruction (its threads, and
        its engine's, inherit the mask): vLLM's CPU worker later binds its threads to those same
        cores, and has nothing to migrate. Seen without it: a restarted rank's new server sat
        minutes in the kernel in sched_setaffinity, its threads on the other rank's busy core.
        Set from here, just after the fork, not between fork and exec (no allocation there)."""
        spec = self.spec
        if spec.device_kind is not DeviceKind.CPU or not spec.devices or self._proc is None:
            return
        try:
            os.sched_setaffinity(self._proc.pid, {int(core) for core in spec.devices})
        except (OSError, ValueError) as exc:  # a core outside our cgroup's set, or already gone
            log.debug("rank %d: cannot place it on cores %s: %s", spec.rank, ",".join(spec.devices), exc)

    @property
    def pgid(self) -> int | None:
        # start_new_session: the server leads its own session and process group.
        return self.pid

    async def start(self) -> None:
        """Spawn the server. Not through asyncio's subprocess API: its child watcher would reap
        the server too, and whichever of it and `wait` saw the exit first, the status reached
        `wait` only a loop iteration or two later (~1 ms at a rank's death, when its pipes close
        at the same moment). This process is reaped by `wait` alone."""
        self._proc = subprocess.Popen(
            self.spec.argv,
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            # Between fork and exec it only calls prctl and os functions (linux.child_setup):
            # no lock another thread of ours could hold.
            preexec_fn=linux.child_setup(os.getpid()),  # noqa: PLW1509
        )
        self._place_on_its_cores()
        self._oom_kills_at_start = linux.oom_kills()
        self.started_at = time.time()
        self.started_monotonic = time.monotonic()
        for pipe, name in ((self._proc.stdout, "stdout"), (self._proc.stderr, "stderr")):
            reader, transport = await _reader_of(pipe)
            self._pipes.append(transport)
            self._pumps.append(asyncio.ensure_future(self.output.pump(reader, name)))

    def oom_killed(self) -> bool | None:
        """Did the kernel's OOM killer kill in our cgroup while this process ran? Ask once it
        exited. None when the cgroup's count cannot be read. (Another process of the container
        killed in that time reads as this one: the container's memory ran out either way.)"""
        now = linux.oom_kills()
        if now is None or self._oom_kills_at_start is None:
            return None
        return now > self._oom_kills_at_start

    async def drain_output(self, timeout: float, *, close: bool = True) -> None:
        """Wait for the pipes to reach end of file (every writer gone), at most `timeout` s."""
        if self._pumps:
            await asyncio.wait(self._pumps, timeout=timeout)
        if close:
            for task in self._pumps:
                task.cancel()
            await asyncio.gather(*self._pumps, return_exceptions=True)
            for transport in self._pipes:  # an orphan may still hold the other end
                transport.close()
            self.output.close()

    async def wait(self) -> int:
        """Reap the server the moment it exits, and return its returncode (-N: signal N).

        A pidfd on the event loop turns readable when the process exits (not when its output
        pipes close, which an orphaned engine keeps open); nothing else reaps this pid (the
        orphan reaper is told it is owned). Call once.
        """
        assert self._proc is not None
        pidfd = os.pidfd_open(self._proc.pid)
        try:
            await linux.readable(pidfd)
            self.exited_at = time.time()
            returncode = linux.reap(pidfd)
        finally:
            os.close(pidfd)
        self.returncode = self._proc.returncode = returncode  # so Popen never waits for it again
        return returncode

    def remember_descendants(self) -> None:
        """Note the tree's processes and the shared memory they map. Call while they live; it may run
        in a thread beside the event loop (it only adds to what it knew)."""
        if self.pid is None:
            return
        for pid in self.tree_pids():
            if pid != self.pid and pid not in self._known:
                try:
                    self._known[pid] = psutil.Process(pid).create_time()
                except psutil.Error:
                    pass
            self.shm_paths |= linux.shm_files_of(pid)

    def tree_pids(self) -> list[int]:
        """The processes of the tree: the server, and every child of the supervisor that belongs to
        this rank (an orphaned engine still in the rank's process group, or a daemon that left it
        with setsid but carries the rank's tag), with all their descendants; plus remembered
        descendants that left the group while their parent lived."""
        if self.pgid is None:
            return []
        roots = [c for c in linux.children_of(os.getpid()) if self._belongs(c)]
        tree = {*roots, *(d for r in roots for d in linux.descendants(r))}
        return sorted(tree | {p.pid for p in self._outsiders()})

    def _belongs(self, pid: int) -> bool:
        if pid == self.pid or linux.pgid_of(pid) == self.pgid:
            return True
        return self._tag is not None and _run_tag_of(pid) == (self._tag, str(self.spec.rank))

    def _strays(self) -> list[int]:
        """Live processes of the tree outside its process group: a signal to the group misses them."""
        return [pid for pid in self.tree_pids() if linux.pgid_of(pid) != self.pgid and not linux.is_zombie(pid)]

    def port_squatters(self, port: int) -> list[int]:
        """Live processes outside the tree that hold the socket listening on `port`.

        Empty when nothing listens, when the tree holds it, or when nobody alive does (a server
        killed a moment ago leaves its socket behind briefly): only a named process is a squatter.
        """
        inodes = linux.listening_inodes(port)
        if not inodes:
            return []
        tree = self.tree_pids()
        if any(linux.holds_any_socket(pid, inodes) for pid in tree):
            return []
        return [pid for pid in linux.socket_holders(inodes) if pid not in tree]

    def remove_shm(self) -> list[str]:
        """Unlink the tree's shared-memory segments. Only once the tree is gone."""
        removed = []
        for path in sorted(self.shm_paths):
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("rank %d: cannot remove %s: %s", self.spec.rank, path, exc.strerror)
        self.shm_paths.clear()
        return removed

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
                self._known.pop(pid, None)  # another thread's scan may have dropped it too
        return alive

    def send(self, sig: int) -> None:
        """`sig` to every process of the tree."""
        if self.pgid is None:
            return
        linux.signal_group(self.pgid, sig)
        for pid in self._strays():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def kill_all_but_trackers(self) -> None:
        """SIGKILL to every process of the tree except multiprocessing's resource trackers, which
        then see their users gone and unlink the semaphores only they know of (a SIGKILLed tracker
        leaves a /dev/shm/sem.mp-* file per rank behind). `send(SIGKILL)` finishes them if not."""
        for pid in self.tree_pids():
            if not linux.is_resource_tracker(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def tree_alive(self) -> bool:
        if self.pgid is None:
            return False
        return linux.group_exists(self.pgid) or bool(self._strays())

    def survivors(self) -> list[int]:
        """Pids of the tree still running (for messages)."""
        return [pid for pid in self.tree_pids() if not linux.is_zombie(pid)]
