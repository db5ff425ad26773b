"""The router's workers, from the supervisor's side: start them on the router socket, feed each
the published view, take in what they report, restart one that dies, and drain them at the stop.

The supervisor's loop never proxies a byte: it sends a few hundred bytes per view change and
reads two small messages a second per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

from vllm_dp_supervisor.core.events import EventKind
from vllm_dp_supervisor.core.machine import Machine
from vllm_dp_supervisor.core.observations import Observation, Stalled, Unreachable
from vllm_dp_supervisor.core.snapshot import PodView
from vllm_dp_supervisor.core.states import RankState
from vllm_dp_supervisor.loops.tasks import Tasks
from vllm_dp_supervisor.procs import linux
from vllm_dp_supervisor.router import protocol
from vllm_dp_supervisor.router_workers.collector import RouterStats
from vllm_dp_supervisor.settings import exits
from vllm_dp_supervisor.settings.config import Config
from vllm_dp_supervisor.settings.plan import router_settings

log = logging.getLogger("supervisor")

VIEW_HEARTBEAT_S = 1.0
RESTART_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
DRAIN_SAY_S = 5.0  # a drain that lasts says what it waits for this often
SEND_BUFFER_LIMIT = 256 << 10  # a worker this far behind gets no views until it catches up
STDERR_LINE = 4096


class _Worker:
    def __init__(self, slot: int, process: asyncio.subprocess.Process) -> None:
        self.started = time.monotonic()
        self.slot = slot
        self.process = process
        self.writer: asyncio.StreamWriter | None = None
        self.view = 0  # the last view it said it routes by (a "load" message)
        self.inflight: dict[int, int] = {}  # per rank, as of that message
        self.stalled: frozenset[int] = frozenset()  # ranks that hold its requests and send nothing
        self.heard = False  # it sent a message: it got going

    def send(self, data: bytes) -> None:
        if self.writer is None:
            return
        transport = self.writer.transport
        if not transport.is_closing() and transport.get_write_buffer_size() < SEND_BUFFER_LIMIT:
            self.writer.write(data)


class RouterWorkers:
    def __init__(self, config: Config, machine: Machine, sock: socket.socket, environ: Mapping[str, str]) -> None:
        self._config = config
        self._machine = machine
        self._sock = sock
        self._environ = dict(environ)
        self.stats = RouterStats()
        self._workers: dict[int, _Worker] = {}
        self._tasks = Tasks()
        self._stopping = False
        self._failures = [0] * config.router_workers
        self._load_changed = asyncio.Event()

    async def start(self) -> None:
        for slot in range(self._config.router_workers):
            await self._spawn(slot)
        self._tasks.spawn(self._feed_views())
        log.info("router on %s:%d: %d worker(s), policy %s", self._config.router_listen_host, self._config.router_port,
                 len(self._workers), self._config.router_policy.value)

    def inflight(self) -> dict[int, int]:
        return self.stats.inflight()

    def pids(self) -> list[int]:
        """The workers' pids, alive or not yet reaped (asyncio reaps them, nobody else may)."""
        return [w.process.pid for w in self._workers.values()]

    def status(self) -> dict[str, Any]:
        """/status's `router`: where it listens, how, and its workers (for an operator's kill -9)."""
        cfg = self._config
        return {"port": cfg.router_port, "policy": cfg.router_policy.value,
                "workers": [{"worker": w.slot, "pid": w.process.pid} for w in sorted(
                    self._workers.values(), key=lambda w: w.slot)],
                "restarts": self.stats.worker_restarts}

    async def _spawn(self, slot: int) -> None:
        cfg = self._config
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "vllm_dp_supervisor.router.worker",
                "--listen-fd", str(self._sock.fileno()), "--channel-fd", str(theirs.fileno()),
                pass_fds=(self._sock.fileno(), theirs.fileno()), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=self._environ,
                start_new_session=True,  # a terminal's ^C is for the supervisor, which drains us
                preexec_fn=linux.child_setup(os.getpid()), limit=STDERR_LINE)
        finally:
            theirs.close()
        # Known before the next await: a SIGCHLD now must not make the orphan reaper take it.
        worker = self._workers[slot] = _Worker(slot, process)
        reader, worker.writer = await asyncio.open_unix_connection(sock=ours, limit=protocol.MAX_LINE)
        self.stats.workers_running = len(self._workers)
        worker.send(protocol.settings_message(router_settings(cfg, [r.spec for r in self._machine.records])))
        worker.send(view_message(self._machine.snapshots.current))
        self._tasks.spawn(self._read(worker, reader))
        self._tasks.spawn(self._log_stderr(worker))
        self._tasks.spawn(self._watch(worker))

    async def _read(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        async for message in protocol.read(reader):
            worker.heard = True
            if (stats := protocol.read_stats(message)) is not None:
                self.stats.report(worker.slot, stats)
            elif (load := protocol.read_load(message)) is not None:
                worker.view, worker.inflight, worker.stalled = load.version, load.inflight, load.stalled
                self._load_changed.set()
                self._load_changed = asyncio.Event()
            elif (resumed := protocol.read_resumed(message)) is not None:
                self._machine.events.publish(EventKind.RESUMED, resumed.from_rank, to_rank=resumed.to_rank,
                                             tokens=resumed.tokens, gap_s=resumed.gap_s)
            elif (report := protocol.read_report(message)) is not None and \
                    0 <= report.rank < len(self._machine.records):
                self._machine.report(observation(report))

    async def _log_stderr(self, worker: _Worker) -> None:
        stream = worker.process.stderr
        assert stream is not None
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # longer than STDERR_LINE: say what fits
                line = (await stream.read(STDERR_LINE)) + b" [...]"
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            if text.startswith("INFO "):  # a worker's own log record (worker.py sets the format)
                log.info("router worker %d: %s", worker.slot, text[5:])
            else:
                log.warning("router worker %d: %s", worker.slot, text)

    async def _watch(self, worker: _Worker) -> None:
        returncode = await worker.process.wait()
        self.stats.retire(worker.slot)
        if worker.writer is not None:
            worker.writer.close()
        if self._workers.get(worker.slot) is worker:
            del self._workers[worker.slot]
        self.stats.workers_running = len(self._workers)
        if self._stopping:
            return
        # One that ran a minute before it died starts over from the first delay.
        failures = self._failures[worker.slot] if time.monotonic() - worker.started < 60 else 0
        delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
        self._failures[worker.slot] = failures + 1
        outcome = exits.describe_exit(returncode)
        log.error("router worker %d (pid %d) %s; starting a new one in %.1f s", worker.slot, worker.process.pid,
                  outcome, delay)
        self._machine.events.publish(EventKind.ROUTER_WORKER, None, worker=worker.slot, pid=worker.process.pid,
                                     outcome=outcome)
        self.stats.worker_restarts += 1
        await asyncio.sleep(delay)
        if not self._stopping:
            await self._spawn(worker.slot)

    async def _feed_views(self) -> None:
        snapshots, version, stalled = self._machine.snapshots, 0, frozenset[int]()
        while True:
            try:
                view = await asyncio.wait_for(snapshots.next(version), VIEW_HEARTBEAT_S)
            except TimeoutError:
                view = snapshots.current  # a heartbeat: a worker that missed a view catches up
            version = view.version
            data = view_message(view)
            for worker in list(self._workers.values()):
                worker.send(data)
            # A rank judged idle (its engine does nothing): its streams continue elsewhere now.
            # Only then: a draining or busy rank keeps them.
            now = frozenset(r.rank for r in view.ranks if r.state is RankState.STALLED)
            if now - stalled:
                self.hand_off(sorted(now - stalled))
            stalled = now

    async def quiesce(self, ranks: list[int], budget: float, cancel: asyncio.Event) -> int:
        """Wait until every worker routes by the current view (in which `ranks` no longer serve)
        and has nothing in flight on them, for at most `budget` s. The requests still in flight
        then (0: drained). Requests on a rank that sends nothing back (stalled) are not waited
        for: a hung engine finishes none of them."""
        version = self._machine.snapshots.current.version
        deadline = time.monotonic() + budget
        while True:
            workers = list(self._workers.values())
            pending = sum(w.inflight.get(r, 0) for w in workers for r in ranks if r not in w.stalled)
            behind = [w for w in workers if w.view < version]
            if not pending and not behind:
                return sum(w.inflight.get(r, 0) for w in workers for r in ranks)  # stalled ones, if any
            remaining = deadline - time.monotonic()
            if remaining <= 0 or cancel.is_set():
                return max(pending, 1 if behind else 0)
            changed = asyncio.ensure_future(self._load_changed.wait())
            cancelled = asyncio.ensure_future(cancel.wait())
            await asyncio.wait([changed, cancelled], timeout=min(remaining, VIEW_HEARTBEAT_S),
                               return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
            cancelled.cancel()

    def hand_off(self, ranks: list[int]) -> None:
        """Every worker ends the streams it carries on `ranks` there, and continues them on other
        ranks (a planned stop waited --drain-timeout for them)."""
        for worker in self._workers.values():
            worker.send(protocol.hand_off_message(ranks))

    async def drain(self, settle: float, budget: float, kill_now: asyncio.Event) -> None:
        """The router's part of a stop: keep serving for `settle` s (load balancers take a moment
        to see /ready turn 503), then stop accepting and let answers under way finish, within
        `budget` s. A second signal cuts both short."""
        if not self._workers:
            return
        if settle > 0 and not kill_now.is_set():
            log.info("router: serving %g s more (--router-settle) while load balancers see /ready 503", settle)
            await _wait_or(kill_now, settle)
        self._stopping = True
        inflight = sum(self.inflight().values())
        log.info("router: no new connections; %d request(s) in flight get up to %g s", inflight, budget)
        for worker in self._workers.values():
            worker.send(protocol.drain_message(budget))
        # Stop listening now, for every process that shares the socket: a new connection is
        # refused (a client retries that elsewhere) instead of waiting in the backlog for a worker
        # that no longer accepts, to be reset when the last copy closes.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RD)
        exited: asyncio.Future = asyncio.ensure_future(
            asyncio.gather(*(w.process.wait() for w in self._workers.values())))
        killed: asyncio.Future = asyncio.ensure_future(kill_now.wait())
        deadline = time.monotonic() + budget + 1
        while (left := deadline - time.monotonic()) > 0:
            done, _ = await asyncio.wait([exited, killed], timeout=min(left, DRAIN_SAY_S),
                                         return_when=asyncio.FIRST_COMPLETED)
            if done:
                break
            self._say_draining()
        killed.cancel()
        await self.stop()

    def _say_draining(self) -> None:
        """The pod's stop waits on these: which, and whether they ever got going."""
        for worker in self._workers.values():
            if worker.process.returncode is None:
                log.info("router worker %d (pid %d) still draining%s", worker.slot, worker.process.pid,
                         "" if worker.heard else ": not a word from it since it started")

    async def stop(self) -> None:
        """Kill what is left and close the router socket (only after the workers: a connection
        waiting in its backlog is refused once the last holder closes it)."""
        self._stopping = True
        for worker in list(self._workers.values()):
            if worker.process.returncode is None:
                log.warning("router worker %d (pid %d) still running: SIGKILL", worker.slot, worker.process.pid)
                worker.process.kill()
        await asyncio.gather(*(w.process.wait() for w in list(self._workers.values())), return_exceptions=True)
        await self._tasks.cancel_all()
        self._sock.close()


def view_message(view: PodView) -> bytes:
    """What a worker may route to: the ranks serving, whatever the pod's own readiness (a drained
    or stopping pod still answers what reaches it until its router drains); and every rank's
    engine, for the cache policy (an index whose engine ended is dropped)."""
    return protocol.view_message(view.version, [(r.rank, r.port, r.attempt) for r in view.ranks if r.serving],
                                 [(r.rank, r.attempt, r.caching) for r in view.ranks])


def observation(report: protocol.Unreachable | protocol.Stalled) -> Observation:
    """A worker's report as the machine takes it."""
    if isinstance(report, protocol.Unreachable):
        return Unreachable(report.rank, report.attempt, report.why)
    return Stalled(report.rank, report.attempt, report.quiet_s, report.requests)


async def _wait_or(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        pass
