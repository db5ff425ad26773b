"""The state machine: the only writer of rank state, and the result collector.

Events reach it three ways, all on the event loop: a rank's exit (an awaited wait on a pidfd, so
it is seen within milliseconds), a probe result, and a signal (the handler only queues it; the
loop dispatches to `handle_<name>`). Every state change goes through `change_state`.

A failed rank either stops the pod (restart policy `never`, or restarts exhausted) or is restarted
alone (`replicas` mode) or with its whole local group (`dp` mode, whose ranks are coupled): its
process tree is stopped and verified gone, the backoff delay passes, a new process starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import signal
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import linux
from .config import Config, LogFormat, Mode, effective_stop_timeout
from .console import Console
from .events import EventLog
from .metrics import Metrics
from .plan import RankSpec, probe_host, url_host
from .probe import Prober, ProbeResult
from .rank import RankProcess, TreeGuard
from .rank_output import RankOutput, rank_log_dir
from .restarts import RestartBudget, RestartPolicy
from .snapshot import PodView, RankView, Snapshots
from .states import (
    ALIVE,
    PROBED,
    RankState,
    SupervisorState,
    check_rank_transition,
    check_supervisor_transition,
)

log = logging.getLogger("supervisor")

# After SIGKILL, how long the kernel gets to tear the trees down before we report survivors.
KILL_GRACE_S = 5.0
# After the SIGKILL, how long multiprocessing's resource trackers get to unlink their semaphores
# (they exit within milliseconds of their last user) before they are SIGKILLed too.
TRACKER_GRACE_S = 1.0
# How often the stop path looks at the process groups: teardown only, never death detection.
TEARDOWN_POLL_S = 0.02
# Once the trees are gone, how long their output pipes get to deliver the last lines.
DRAIN_S = 2.0
# After a server exits, how long its stderr gets to deliver its last words to the exit event.
LAST_WORDS_S = 0.5
EXIT_REQUESTED = 0
EXIT_FAILED = 1


@dataclasses.dataclass(frozen=True)
class Failure:
    """A reason to stop that was not asked for. The earliest one decides the exit code."""
    at: float  # time.monotonic()
    rank: int
    code: int
    reason: str


class RefusedAction(Exception):
    """An operator action that cannot be done now (HTTP 409)."""


@dataclasses.dataclass
class RankRecord:
    """What the supervisor knows of one rank. Written only by `Supervisor`."""
    spec: RankSpec
    process: RankProcess
    budget: RestartBudget
    state: RankState = RankState.STARTING
    attempt: int = 0
    consecutive_failures: int = 0
    deep_failures: int = 0
    last_probe_ms: float | None = None
    last_probe_error: str | None = None
    ready_after_s: float | None = None
    ready_since: float | None = None  # monotonic, while READY
    outcome: str | None = None
    exit_code: int | None = None
    ended_monotonic: float | None = None
    killed_by_supervisor: bool = False
    failure_reason: str | None = None  # set when the rank failed by itself, not by our stop
    # Its last error as it stood when it failed: what it printed while we stopped it is not why.
    failure_error: str | None = None
    failure_exited: bool = False  # failed by exiting (its last words explain it) or while alive
    next_restart_at: float | None = None  # wall clock, while in BACKOFF
    restarting: bool = False  # a restart of this rank is under way
    restart_now: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    @property
    def rank(self) -> int:
        return self.spec.rank

    @property
    def log(self) -> logging.LoggerAdapter:
        """The supervisor's logger, with the rank attached (a field of its own in JSON lines)."""
        return logging.LoggerAdapter(log, {"rank": self.spec.rank})

    def run_time_s(self) -> float | None:
        start = self.process.started_monotonic
        if start is None:
            return None
        return (self.ended_monotonic or time.monotonic()) - start

    def new_attempt(self, process: RankProcess) -> None:
        """A fresh process for this rank: what described the last one goes."""
        self.process = process
        self.attempt += 1
        self.consecutive_failures = self.deep_failures = 0
        self.last_probe_ms = self.last_probe_error = self.ready_after_s = self.ready_since = None
        self.outcome = self.exit_code = self.ended_monotonic = self.next_restart_at = None
        self.failure_reason = self.failure_error = None
        self.failure_exited = False
        self.killed_by_supervisor = False
        self.restart_now.clear()


class Supervisor:
    def __init__(self, config: Config, specs: Sequence[RankSpec], *, environ: Mapping[str, str],
                 guard: TreeGuard | None = None, console: Console | None = None,
                 log_dir: Path | None = None,
                 admin_token: str | None = None) -> None:
        """`log_dir`: this run's directory for rank log files (None: keep none)."""
        self.config = config
        self.stop_timeout = effective_stop_timeout(config)
        self.log_dir = log_dir
        self.admin_token = admin_token
        self._environ = environ
        self._console = console
        # A dp group restarts as one, so it has one budget: else ranks failing in turn would get
        # ranks x --max-restarts restarts.
        shared = RestartBudget(config.restart_rules) if config.mode is Mode.DP else None
        self.records = [RankRecord(spec, self._new_process(spec, 0), shared or RestartBudget(config.restart_rules))
                        for spec in specs]
        self.events = EventLog()
        self.state = SupervisorState.RUNNING
        self.draining = False
        self.stop_reason: str | None = None
        self.failures: list[Failure] = []
        self._guard = guard
        self._stop_signal: int = signal.SIGTERM
        self._stop_requested = asyncio.Event()
        self._kill_now = asyncio.Event()
        self._signals: asyncio.Queue[int] = asyncio.Queue()
        self._tasks: set[asyncio.Task] = set()
        # Held while a process is being spawned: a stop takes it before it looks at the ranks,
        # so no process can appear behind its back.
        self._spawn_lock = asyncio.Lock()
        self._group_restarting = False
        self._credentials_refused = False
        self._host = url_host(probe_host(config.host))
        self.snapshots = Snapshots(self._view())
        # Last: its collector reads the state above.
        self.metrics = Metrics(lambda: self.snapshots.current, len(specs))

    def _new_process(self, spec: RankSpec, attempt: int) -> RankProcess:
        cfg = self.config
        tee = cfg.tee is None or spec.rank in cfg.tee
        output = RankOutput(spec.rank, self._console if tee else None,
                            log_dir=None if self.log_dir is None else rank_log_dir(self.log_dir, spec.rank, attempt),
                            max_bytes=cfg.log_max_bytes, json_console=cfg.log_format is LogFormat.JSON)
        return RankProcess(spec, self._environ, output)

    # ---- the only writers of state ----

    def change_state(self, record: RankRecord, new: RankState, why: str) -> None:
        check_rank_transition(record.state, new)
        old, record.state = record.state, new
        record.ready_since = time.monotonic() if new is RankState.READY else None
        level = logging.INFO if new in (RankState.READY, RankState.STOPPING, RankState.STARTING,
                                        RankState.BACKOFF) else logging.WARNING
        if new is RankState.EXITED and (self.state is not SupervisorState.RUNNING or old is RankState.STOPPING):
            level = logging.INFO
        # Reasons that already name the rank ("rank 0 unhealthy: 3 probes failed ...") are said once.
        said = why.removeprefix(f"rank {record.rank} {new.value}: ").removeprefix(f"rank {record.rank}: ")
        self._publish()  # before anyone else runs: /ready answers 503 from here
        record.log.log(level, "rank %d %s: %s", record.rank, new.value, said)
        self.events.publish("state", record.rank, old=old.value, new=new.value, why=why)

    def _change_supervisor_state(self, new: SupervisorState, why: str) -> None:
        check_supervisor_transition(self.state, new)
        self.state = new
        self._publish()
        log.info("supervisor %s: %s", new.value, why)
        self.events.publish("supervisor", None, new=new.value, why=why)

    def _view(self) -> PodView:
        return PodView(0, self.state, self.draining, self.config.ready_quorum, tuple(
            RankView(r.rank, r.spec.port, r.process.pid, r.state, r.attempt, r.budget.total, r.ready_after_s)
            for r in self.records))

    def _publish(self) -> None:
        """Every write of what the view shows ends here: readers never see a half-made change."""
        self.snapshots.publish(self._view())

    # ---- what the API reads: the published view ----

    @property
    def ready(self) -> bool:
        return self.snapshots.current.ready

    @property
    def live(self) -> bool:
        return self.snapshots.current.live

    def rank_ready(self, rank: int) -> bool:
        return self.snapshots.current.rank_ready(rank)

    @staticmethod
    def _starting_for(record: RankRecord) -> float | None:
        start = record.process.started_monotonic
        if record.state is not RankState.STARTING or start is None:
            return None
        return round(time.monotonic() - start, 3)

    @staticmethod
    def _last_error(record: RankRecord) -> str | None:
        if not record.failure_reason:
            return None
        return record.failure_error or record.process.output.last_error()

    def not_ready(self) -> list[dict[str, Any]]:
        return self.snapshots.current.not_ready()

    def status(self) -> dict[str, Any]:
        # Deliberately no argv and no environment: they carry API keys and tokens.
        view = self.snapshots.current
        return {
            "ready": view.ready,
            "stopping": not view.live,
            "draining": view.draining,
            "state": view.state.value,
            "stop_reason": self.stop_reason,
            "ready_ranks": view.ready_ranks,
            "min_ready_ranks": view.min_ready_ranks,
            "ranks": [{
                "rank": r.rank,
                "port": r.spec.port,
                "pid": r.process.pid,
                "state": r.state.value,
                "devices": r.spec.devices_text,
                "consecutive_failures": r.consecutive_failures,
                "deep_probe_failures": r.deep_failures,
                "last_probe_ms": None if r.last_probe_ms is None else round(r.last_probe_ms, 3),
                "last_probe_error": r.last_probe_error,
                "ready_after_s": None if r.ready_after_s is None else round(r.ready_after_s, 3),
                "exit_code": r.exit_code,
                "outcome": r.outcome,
                "last_error": self._last_error(r),
                "log_tail": list(r.process.output.stderr_tail) if r.failure_reason else None,
                "last_line": r.process.output.last_line,
                "started_at": r.process.started_at,
                "starting_for_s": self._starting_for(r),
                "recovering": r.state is RankState.RECOVERING,
                "restarts": r.budget.total,
                "attempt": r.attempt,
                "next_restart_at": r.next_restart_at,
                "log_dir": None if r.process.output.log_dir is None else str(r.process.output.log_dir),
            } for r in self.records],
        }

    # ---- signals: the handler queues, the loop dispatches ----

    def post_signal(self, signum: int) -> None:
        """Installed with loop.add_signal_handler; does nothing but queue."""
        self._signals.put_nowait(signum)

    async def _dispatch_signals(self) -> None:
        while True:
            signum = await self._signals.get()
            name = signal.Signals(signum).name
            handler = getattr(self, "handle_" + name[3:].lower(), None)
            if handler is None:
                log.warning("ignoring %s", name)
            else:
                handler()

    def handle_term(self) -> None:
        self.request_stop("SIGTERM received", signal.SIGTERM, second_kills=True)

    def handle_int(self) -> None:
        self.request_stop("SIGINT received", signal.SIGINT, second_kills=True)

    def handle_hup(self) -> None:
        # No reload: a hang-up means the terminal went away. Ranks get the signal they drain on.
        self.request_stop("SIGHUP received", signal.SIGTERM, second_kills=True)

    def handle_quit(self) -> None:
        # A stop without the grace: every rank is SIGKILLed at once, the rest is as orderly.
        self.request_stop("SIGQUIT received", signal.SIGTERM)
        if not self._kill_now.is_set():
            log.warning("SIGQUIT: killing every rank now, without waiting --stop-timeout")
            self._kill_now.set()

    def handle_usr1(self) -> None:
        log.info("status (SIGUSR1): %s", json.dumps(self.status()))

    def handle_usr2(self) -> None:
        root = logging.getLogger()
        debug = root.level != logging.DEBUG
        root.setLevel(logging.DEBUG if debug else self.config.log_level.upper())
        log.info("log level %s (SIGUSR2)", "debug" if debug else self.config.log_level)

    def handle_chld(self) -> None:
        self.reap_orphans()

    def reap_orphans(self) -> None:
        """Reap, by pid, children asyncio does not own: engines orphaned to us as subreaper."""
        owned = {r.process.pid for r in self.records if r.process.pid is not None}
        if self._guard is not None and self._guard.pid is not None:
            owned.add(self._guard.pid)
        for pid, returncode in linux.reap_orphans(owned):
            log.debug("reaped orphan pid %d (%s)", pid, linux.describe_exit(returncode))

    # ---- operator actions (the API checks the token; these check the state) ----

    def drain(self) -> dict[str, Any]:
        self._refuse_while_stopping()
        was, self.draining = self.draining, True
        self._publish()
        if not was:
            log.info("draining: /ready answers 503 while the ranks keep serving")
            self.events.publish("drain", None, draining=True)
        return {"draining": True, "changed": not was}

    def undrain(self) -> dict[str, Any]:
        self._refuse_while_stopping()
        was, self.draining = self.draining, False
        self._publish()
        if was:
            log.info("undrained: /ready follows the ranks again")
            self.events.publish("drain", None, draining=False)
        return {"draining": False, "changed": was}

    def restart_rank(self, rank: int) -> dict[str, Any]:
        """Restart one rank now (a rank waiting in backoff starts at once)."""
        self._refuse_while_stopping()
        record = self.records[rank]
        if record.state is RankState.BACKOFF:
            record.restart_now.set()
            return {"rank": rank, "restarting": True, "note": "backoff cut short"}
        if record.restarting or self._group_restarting:
            raise RefusedAction(f"rank {rank} is already restarting")
        record.budget.count_operator_restart()
        self._begin_restart(record, 0.0, "restart requested by an operator")
        return {"rank": rank, "restarting": True}

    def operator_stop(self) -> dict[str, Any]:
        """POST /stop: the same as SIGTERM."""
        self._refuse_while_stopping()
        self.request_stop("POST /stop by an operator")
        return {"stopping": True}

    def _refuse_while_stopping(self) -> None:
        if self.state is not SupervisorState.RUNNING:
            raise RefusedAction(f"the supervisor is {self.state.value}")

    # ---- stopping everything ----

    def request_stop(self, reason: str, sig: int = signal.SIGTERM, *, second_kills: bool = False) -> None:
        """Turn unready at once and stop every rank. A second signal kills without waiting."""
        if self.state is not SupervisorState.RUNNING:
            if second_kills and not self._kill_now.is_set():
                log.warning("%s while stopping: killing every rank now", reason)
                self._kill_now.set()
            return
        self.stop_reason = reason
        self._stop_signal = sig
        self.events.publish("stop", None, reason=reason, signal=signal.Signals(sig).name,
                            by="failure" if self.failures else "request")
        self._change_supervisor_state(SupervisorState.STOPPING, reason)
        self._stop_requested.set()

    def _fail(self, record: RankRecord, code: int, reason: str) -> None:
        """Stop the pod because of this rank (no restart allowed)."""
        record.failure_reason = reason
        if self.state is not SupervisorState.RUNNING:
            return  # the stop under way was decided by an earlier event
        self.failures.append(Failure(time.monotonic(), record.rank, code, reason))
        self.request_stop(reason, signal.SIGTERM)

    async def _stop_all(self) -> None:
        async with self._spawn_lock:  # no spawn in flight; none can start (state is STOPPING)
            for record in self.records:
                if record.state is RankState.BACKOFF:
                    self.change_state(record, RankState.EXITED, "not restarted: the supervisor is stopping")
            started = [r for r in self.records if r.process.pid is not None]
        await self._stop_trees(started, self._stop_signal, interruptible=True)
        await self._stop_unowned()
        await asyncio.gather(*(r.process.drain_output(DRAIN_S) for r in started))

    async def _stop_unowned(self) -> None:
        """Whatever was re-parented to us and belongs to no rank (it cleared its environment)
        is stopped too: nothing the run started may outlive it."""
        def unowned() -> list[int]:
            guardian = self._guard.pid if self._guard is not None else None
            roots = [c for c in linux.children_of(os.getpid()) if c != guardian and not linux.is_zombie(c)]
            return [*roots, *(d for r in roots for d in linux.descendants(r))]
        strays = unowned()
        if not strays:
            return
        log.warning("stopping %s: re-parented to the supervisor, of no rank", linux.describe_pids(strays))
        for sig, wait in ((signal.SIGTERM, TRACKER_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
            for pid in strays:
                for s in (sig, signal.SIGCONT):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, s)
            deadline = time.monotonic() + wait
            while (strays := unowned()) and time.monotonic() < deadline:
                await asyncio.sleep(TEARDOWN_POLL_S)
                self.reap_orphans()
            if not strays:
                return
        log.error("pids %s survived SIGKILL", strays)

    async def _watch_guardian(self) -> None:
        """The guardian is what cleans up after a SIGKILLed supervisor: watched like a rank (its
        exit seen on a pidfd at once), and restarted, told everything the last one knew."""
        while self._guard is not None and (pid := self._guard.pid) is not None:
            await linux.exited(pid)
            code = self._guard.reap()
            outcome = linux.describe_exit(code) if code is not None else "exited"
            log.error("the process-tree guardian (pid %d) %s; starting a new one", pid, outcome)
            self.events.publish("guardian", None, pid=pid, outcome=outcome)
            self._guard.start()
            log.info("process-tree guardian running again: pid %d", self._guard.pid)

    async def _stop_trees(self, records: list[RankRecord], sig: int, *, interruptible: bool) -> None:
        """Signal each rank's tree, wait --stop-timeout, SIGKILL what survives, wait until gone;
        then remove their shared memory. Used for the whole pod and for one rank's restart."""
        for record in records:
            if record.state in ALIVE:
                self.change_state(record, RankState.STOPPING, f"sent {signal.Signals(sig).name}")
            record.process.remember_descendants()
            record.process.send(sig)
            # A stopped (SIGSTOP) process only acts on the signal once continued.
            record.process.send(signal.SIGCONT)
        if not await self._wait_trees_gone(records, self.stop_timeout, interruptible=interruptible):
            await self._kill_trees(records)
        for record in records:
            if not record.process.tree_alive():
                self._forget_tree(record)

    async def _kill_trees(self, records: list[RankRecord]) -> None:
        """SIGKILL, sparing multiprocessing's resource trackers for TRACKER_GRACE_S (they unlink
        the semaphores only they know of), then everything; say what survives even that."""
        why = "second signal" if self._kill_now.is_set() else \
            f"still running after --stop-timeout {self.stop_timeout:g} s"
        for record in records:
            if record.process.tree_alive():
                record.log.warning("rank %d: %s; SIGKILL to pids %s", record.rank, why, record.process.survivors())
                record.killed_by_supervisor = True
                record.process.kill_all_but_trackers()
        if not await self._wait_trees_gone(records, TRACKER_GRACE_S, interruptible=False):
            for record in records:
                record.process.send(signal.SIGKILL)
        if await self._wait_trees_gone(records, KILL_GRACE_S, interruptible=False):
            return
        for record in records:
            if record.process.tree_alive():
                record.log.error("rank %d: pids %s survived SIGKILL for %g s (uninterruptible sleep in the "
                                 "kernel?)", record.rank, record.process.survivors(), KILL_GRACE_S)

    def _forget_tree(self, record: RankRecord) -> None:
        """A tree verified gone: its shared memory is removed, and the guardian lets it go."""
        removed = record.process.remove_shm()
        if removed:
            record.log.info("rank %d: removed shared memory %s", record.rank, " ".join(removed))
        if self._guard is not None and record.process.pgid is not None:
            self._guard.release(record.process.pgid)

    async def _wait_trees_gone(self, records: Iterable[RankRecord], timeout: float, *, interruptible: bool) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self.reap_orphans()
            if all(r.process.returncode is not None and not r.process.tree_alive() for r in records):
                return True
            if time.monotonic() >= deadline or (interruptible and self._kill_now.is_set()):
                return False
            await asyncio.sleep(TEARDOWN_POLL_S)

    # ---- a failed rank: restart it, or stop the pod ----

    def _rank_failed(self, record: RankRecord, code: int, reason: str, exit_code: int | None) -> None:
        """`code`: the supervisor's exit code if this ends the pod. `exit_code`: the rank's own,
        None when it is alive but failing (hung, unhealthy, not ready in time)."""
        record.failure_reason = reason
        record.failure_exited = exit_code is not None
        if exit_code is None:
            record.failure_error = record.process.output.last_error()
        if self.state is not SupervisorState.RUNNING or self._group_restarting:
            return  # a stop or a group restart under way already covers this rank
        if record.ready_since is not None:
            record.budget.note_ready_for(time.monotonic() - record.ready_since)
        decision = record.budget.decide(time.monotonic(), exit_code, random.random())
        if not decision.restart:
            if self.config.restart_policy is not RestartPolicy.NEVER:
                reason = f"{reason}; {decision.why}"
            self._fail(record, code, reason)
            return
        self._begin_restart(record, decision.delay_s, reason)

    def _begin_restart(self, record: RankRecord, delay: float, why: str) -> None:
        self.metrics.restarts.labels(str(record.rank)).inc()
        self._publish()  # its restart count
        group = self.config.mode is Mode.DP
        self.events.publish("restart", record.rank, attempt=record.attempt + 1, delay_s=round(delay, 3),
                            reason=why, group=group)
        if group:  # MoE ranks are coupled: the whole local group goes down and comes back
            self._group_restarting = True
            self._spawn_task(self._restart(self.records, delay, why))
        else:
            self._spawn_task(self._restart([record], delay, why))

    async def _restart(self, records: list[RankRecord], delay: float, why: str) -> None:
        for record in records:
            record.restarting = True
        try:
            await self._stop_trees(records, signal.SIGTERM, interruptible=False)
            if self.state is not SupervisorState.RUNNING:
                return
            wake_at = time.time() + delay
            for record in records:
                record.next_restart_at = round(wake_at, 3)
                self.change_state(record, RankState.BACKOFF, f"restarting in {delay:.1f} s ({why})")
            waits = [asyncio.ensure_future(e.wait()) for e in
                     (self._stop_requested, *(r.restart_now for r in records))]
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            for record in records:
                if self.state is not SupervisorState.RUNNING:
                    return
                record.new_attempt(self._new_process(record.spec, record.attempt + 1))
                self.change_state(record, RankState.STARTING, f"attempt {record.attempt}")
                await self._start_rank(record)
        finally:
            for record in records:
                record.restarting = False
            if records is self.records:
                self._group_restarting = False

    # ---- ranks ----

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_rank(self, record: RankRecord) -> None:
        async with self._spawn_lock:
            if self.state is not SupervisorState.RUNNING:
                return
            try:
                await record.process.start()
            except OSError as exc:
                record.outcome = f"could not start: {exc.strerror or exc}"
                record.exit_code = 127
                self.change_state(record, RankState.EXITED, record.outcome)
                self._fail(record, 127, f"rank {record.rank} {record.outcome}")
                return
            self._publish()  # its pid
        if self._guard is not None and record.process.pgid is not None:
            self._guard.guard(record.process.pgid)
        record.log.info("rank %d started: pid %d, port %d, %s %s", record.rank, record.process.pid,
                        record.spec.port, "CUDA_VISIBLE_DEVICES" if record.spec.device_kind.value == "cuda"
                        else "cores", record.spec.devices_text or "-")
        self._spawn_task(self._watch_exit(record, record.process))
        self._spawn_task(self._probe_loop(record, record.process))

    async def _watch_exit(self, record: RankRecord, process: RankProcess) -> None:
        returncode = await process.wait()
        self._on_exit(record, returncode)
        # The state change went out at once; the exit event waits a moment for the last words
        # the server wrote to stderr before it died, so it can carry its error.
        await process.drain_output(LAST_WORDS_S, close=False)
        last_error = process.output.last_error()
        if record.process is process and record.failure_exited and record.failure_error is None:
            record.failure_error = last_error
        self.events.publish("exit", record.rank, exit_code=linux.exit_code(returncode),
                            outcome=record.outcome, last_error=last_error)

    def _remember_tree(self, record: RankRecord) -> None:
        record.process.remember_descendants()
        if self._guard is not None:
            self._guard.cleanup_files(record.process.shm_paths)

    def _on_exit(self, record: RankRecord, returncode: int) -> None:
        record.ended_monotonic = time.monotonic()
        record.exit_code = linux.exit_code(returncode)
        failed_by_itself = False
        if record.killed_by_supervisor and returncode == -signal.SIGKILL:
            record.outcome = "killed by SIGKILL from the supervisor"
            reason = "killed_by_supervisor"
        elif record.state in PROBED and self.state is SupervisorState.RUNNING:
            failed_by_itself = True
            record.outcome = linux.describe_exit(returncode)
            reason = "signal" if returncode < 0 else "exit_code"
            if returncode == 0:
                record.outcome += " by itself (a server that ends on its own has failed)"
                reason = "exit_zero"
        elif record.state is RankState.UNHEALTHY:  # declared failed already; it went first
            record.outcome = linux.describe_exit(returncode)
            reason = "signal" if returncode < 0 else "exit_code"
        else:
            record.outcome = f"stopped ({linux.describe_exit(returncode)})"
            reason = "stopped"
        self.metrics.exits.labels(str(record.rank), reason).inc()
        self.change_state(record, RankState.EXITED, record.outcome)  # /ready answers 503 from here
        # Its engine processes may live on, re-parented to us: note them and their shared memory.
        self._remember_tree(record)
        if failed_by_itself:
            code = record.exit_code if record.exit_code != 0 else EXIT_FAILED
            self._rank_failed(record, code, f"rank {record.rank} {record.outcome}", record.exit_code)

    async def _probe_loop(self, record: RankRecord, process: RankProcess) -> None:
        url = f"http://{self._host}:{record.spec.port}/health"
        cfg = self.config
        started = time.monotonic()
        next_progress = started + cfg.progress_interval
        while record.process is process and record.state in PROBED:
            tick = time.monotonic()
            if record.state is RankState.STARTING:
                remaining = cfg.startup_timeout - (tick - started)
                if remaining <= 0:
                    self._unhealthy(record, f"rank {record.rank} not ready after --startup-timeout "
                                    f"{cfg.startup_timeout:g} s" + (f" (last probe: {record.last_probe_error})"
                                                                    if record.last_probe_error else ""))
                    return
                if tick >= next_progress:
                    next_progress += cfg.progress_interval
                    record.log.info("rank %d not ready after %.0f s: %s", record.rank, tick - started,
                                    record.process.output.last_line or "(no output yet)")
                result = await self._prober.probe(url, min(cfg.probe_timeout, remaining))
                interval = cfg.startup_probe_interval
            else:
                result = await self._prober.probe(url, cfg.probe_timeout)
                interval = cfg.probe_interval
            if record.process is not process:
                return  # restarted while the probe was in flight
            self._on_probe(record, result, time.monotonic() - started)
            await asyncio.sleep(max(0.0, tick + interval - time.monotonic()))

    def _on_probe(self, record: RankRecord, result: ProbeResult, since_start: float) -> None:
        if record.state not in PROBED:
            return  # the rank moved on while the probe was in flight
        rank = str(record.rank)
        self.metrics.probe_duration.labels(rank).observe(result.elapsed_ms / 1000)
        if result.failure is not None:
            # Refused probes while a model loads are expected (thousands in a long load): counted
            # apart, so an alert on probe failures means a rank that was ready.
            failures = self.metrics.startup_probe_failures if record.state is RankState.STARTING \
                else self.metrics.probe_failures
            failures.labels(rank, result.failure.value).inc()
        record.last_probe_ms = result.elapsed_ms
        record.last_probe_error = None if result.ok else result.detail
        if record.state is RankState.RECOVERING and not result.ok:
            return  # the in-engine recovery under way decides this rank's fate
        if result.ok:
            record.consecutive_failures = 0
            if record.state is RankState.STARTING:
                if not self._answered_by_rank(record):
                    return
                record.ready_after_s = since_start
                self.change_state(record, RankState.READY, f"ready after {since_start:.1f} s")
                self._remember_tree(record)
                if self.config.deep_probe_interval > 0:
                    self._spawn_task(self._deep_probe_loop(record, record.process))
                if all(r.state is RankState.READY for r in self.records):
                    log.info("all %d ranks ready", len(self.records))
            return
        if record.state is RankState.STARTING:
            if result.status is not None:
                self._answered_by_rank(record)
            return  # refused while loading is expected; --startup-timeout bounds it
        record.consecutive_failures += 1
        record.log.warning("rank %d probe failed (%d/%d): %s", record.rank, record.consecutive_failures,
                           self.config.failure_threshold, result.detail)
        if record.consecutive_failures >= self.config.failure_threshold:
            self.events.publish("probe_failures", record.rank, consecutive=record.consecutive_failures,
                                threshold=self.config.failure_threshold, last=result.detail)
            self._unhealthy(record, f"rank {record.rank} unhealthy: {record.consecutive_failures} probes "
                                    f"failed in a row (last: {result.detail})")

    async def _deep_probe_loop(self, record: RankRecord, process: RankProcess) -> None:
        """vLLM's /health answers 200 while its engine is stuck; a one-token completion does not.
        Skipped while the rank's token counters move: real traffic proves the engine works."""
        cfg = self.config
        base = f"http://{self._host}:{record.spec.port}"
        model: str | None = None
        tokens = await self._prober.token_count(base, cfg.probe_timeout)

        def current() -> bool:
            return record.process is process and record.state in (RankState.READY, RankState.RECOVERING)

        while True:
            await asyncio.sleep(cfg.deep_probe_interval)
            if not current():
                return
            if record.state is RankState.RECOVERING:
                continue  # a halted engine answers nothing; the recovery decides, then probing resumes
            now_tokens = await self._prober.token_count(base, cfg.probe_timeout)
            if now_tokens is not None and tokens is not None and now_tokens > tokens:
                tokens, record.deep_failures = now_tokens, 0
                continue
            if model is None:
                model, result = await self._prober.model_name(base, cfg.probe_timeout)
            if model is not None:
                result = await self._prober.probe(f"{base}/v1/completions", cfg.deep_probe_timeout,
                                                  {"model": model, "prompt": "ping", "max_tokens": 1})
            if not current():
                return
            if record.state is RankState.RECOVERING:
                continue  # it entered a recovery while the probe ran: this failure says nothing
            if result.ok:
                tokens = await self._prober.token_count(base, cfg.probe_timeout)  # ours included
            if not self._on_deep_probe(record, result):
                return

    def _on_deep_probe(self, record: RankRecord, result: ProbeResult) -> bool:
        """The verdict on one deep probe of a ready rank; False when the loop should end."""
        cfg = self.config
        if result.unauthorized:
            self._refused_credentials(record, result)
            return False
        if result.ok:
            record.deep_failures = 0
            return True
        record.deep_failures += 1
        record.log.warning("rank %d deep probe failed (%d/%d): %s", record.rank, record.deep_failures,
                           cfg.failure_threshold, result.detail)
        if record.deep_failures < cfg.failure_threshold:
            return True
        self.events.publish("probe_failures", record.rank, consecutive=record.deep_failures,
                            threshold=cfg.failure_threshold, last=result.detail, probe="deep")
        self._unhealthy(record, f"rank {record.rank} hung: {record.deep_failures} one-token completions "
                                f"failed in a row (last: {result.detail}) while /health answered")
        return False

    def _refused_credentials(self, record: RankRecord, result: ProbeResult) -> None:
        """A rank that refuses our key is misconfigured, not hung: said once, never counted."""
        if self._credentials_refused:
            return
        self._credentials_refused = True
        given = "the key from the server arguments / VLLM_API_KEY" if self.config.server.api_key else "no key"
        record.log.error(
            "rank %d refused the supervisor's deep probe with %s (the supervisor sent %s): the "
            "ranks require an API key the supervisor cannot find (it reads --api-key, --config and "
            "VLLM_API_KEY); hung engines behind a healthy /health will not be caught. Not counted "
            "as a rank failure.", record.rank, result.detail, given)

    # ---- vLLM's in-engine recovery (--enable-fault-tolerance): we are its orchestrator ----

    async def _ft_watch(self) -> None:
        """Poll each ready rank's /fault_tolerance/status; a faulted engine starts a recovery."""
        while self.state is SupervisorState.RUNNING:
            await asyncio.sleep(self.config.probe_interval)
            for record in self.records:
                if record.state is not RankState.READY or record.restarting:
                    continue
                faulted = await self._ft_faulted(record)
                if faulted and record.state is RankState.READY:
                    group = self.records if self.config.mode is Mode.DP else [record]
                    for r in group:
                        if r.state is RankState.READY:
                            self.change_state(r, RankState.RECOVERING, f"engine fault in rank {record.rank}'s group")
                    self._spawn_task(self._ft_recover(record, group, faulted))

    async def _ft_faulted(self, record: RankRecord) -> list[dict]:
        status = await self._prober.get_json(
            f"http://{self._host}:{record.spec.port}/fault_tolerance/status", self.config.probe_timeout)
        engines = status.get("engines", []) if isinstance(status, dict) else []
        return [e for e in engines if isinstance(e, dict) and e.get("status") != "healthy"]

    async def _ft_recover(self, record: RankRecord, group: list[RankRecord], faulted: list[dict]) -> None:
        """Unready while faulted; `retry` to every rank of the group; wait for all healthy; if
        that fails or times out, fall back to restarting (the restart policy decides)."""
        ranks = [r.rank for r in group]
        info = ", ".join(f"engine {e.get('id')} {e.get('status')}"
                         + (f" ({e['fault_info']})" if e.get("fault_info") else "") for e in faulted)
        record.log.warning("rank %d: %s; group %s unready while it recovers", record.rank, info, ranks)
        self.events.publish("fault", record.rank, engines=faulted, group=ranks)
        why = await self._ft_retry(group, faulted)
        if why is None:
            for r in group:
                if r.state is RankState.RECOVERING:
                    self.change_state(r, RankState.READY, "in-engine recovery done")
            record.log.info("rank %d: in-engine recovery done; group %s ready again", record.rank, ranks)
            self.events.publish("recovered", record.rank, group=ranks)
            return
        self.events.publish("recovery_failed", record.rank, group=ranks, why=why)
        # The others stay unready (recovering) until the restart or the stop that follows.
        if record.state is RankState.RECOVERING and self.state is SupervisorState.RUNNING:
            self._unhealthy(record, f"rank {record.rank}: in-engine recovery failed ({why})")

    async def _ft_retry(self, group: list[RankRecord], faulted: list[dict]) -> str | None:
        """None once every engine of the group is healthy again, else why not."""
        if any(e.get("status") == "dead" for e in faulted):
            return "an engine is dead, not recoverable"
        for r in group:
            code = await self._prober.post_json(f"http://{self._host}:{r.spec.port}/fault_tolerance/apply",
                                                {"instruction": "retry"}, self.config.probe_timeout)
            if code not in (200, 202):
                return f"rank {r.rank} answered the retry with {code or 'nothing'}"
        deadline = time.monotonic() + self.config.ft_recovery_timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(TEARDOWN_POLL_S * 10)
            if self.state is not SupervisorState.RUNNING:
                return "the supervisor is stopping"
            pending = []
            for r in group:
                bad = await self._ft_faulted(r)
                errors = [e["ft_error"] for e in bad if e.get("ft_error")]
                if errors or any(e.get("status") == "dead" for e in bad):
                    return f"rank {r.rank}: " + (errors[0] if errors else "an engine died")
                pending += bad
            if not pending:
                return None
        return f"not healthy {self.config.ft_recovery_timeout:g} s after the retry (--ft-recovery-timeout)"

    def _unhealthy(self, record: RankRecord, reason: str) -> None:
        """Alive but failing: treated like a crash (its tree is stopped if it is restarted)."""
        self.change_state(record, RankState.UNHEALTHY, reason)
        self._rank_failed(record, EXIT_FAILED, reason, None)

    def _answered_by_rank(self, record: RankRecord) -> bool:
        """A probe counts only if no other process listens on the rank's port; else start-up fails.

        vLLM binds its port early but listens late: another program can take the port meanwhile,
        and would otherwise answer the probes for it.
        """
        squatters = record.process.port_squatters(record.spec.port)
        if not squatters:
            return True
        reason = (f"rank {record.rank}: port {record.spec.port} is answered by {linux.describe_pids(squatters)}, "
                  "not by the rank's server")
        self.change_state(record, RankState.UNHEALTHY, reason)
        self._fail(record, EXIT_FAILED, reason)  # a restart would meet the same squatter
        return False

    # ---- the whole run ----

    async def run(self) -> int:
        dispatcher = asyncio.ensure_future(self._dispatch_signals())
        try:
            async with Prober(self.config.server.api_key) as self._prober:
                self._spawn_task(self._watch_guardian())
                for record in self.records:
                    await self._start_rank(record)
                if self.config.fault_tolerance:
                    self._spawn_task(self._ft_watch())
                await self._stop_requested.wait()
                await self._stop_all()
                for task in list(self._tasks):
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            dispatcher.cancel()
        self._change_supervisor_state(SupervisorState.STOPPED, "every rank's process tree is gone")
        self.events.close()
        code = self.exit_code()
        self._log_summary(code)
        return code

    def exit_code(self) -> int:
        if self.failures:
            return min(self.failures, key=lambda f: f.at).code
        return EXIT_REQUESTED

    def _log_summary(self, code: int) -> None:
        log.info("%-4s %-8s %-6s %-5s %-9s %-8s %s", "rank", "pid", "port", "exit", "ran", "restarts", "outcome")
        for r in self.records:
            ran = r.run_time_s()
            outcome = r.outcome or r.state.value
            error = self._last_error(r)
            r.log.info("%-4d %-8s %-6d %-5s %-9s %-8d %s%s", r.rank, r.process.pid or "-", r.spec.port,
                       "-" if r.exit_code is None else r.exit_code,
                       "-" if ran is None else f"{ran:.1f}s", r.budget.total, outcome,
                       f"; last error: {error}" if error else "")
        if self.log_dir is not None:
            log.info("rank logs: %s", self.log_dir)
        if self.failures:
            first = min(self.failures, key=lambda f: f.at)
            failed = self.records[first.rank]
            # A rank that exited says why in its last words; a hung one's reason says it all.
            error = self._last_error(failed) if failed.failure_exited else None
            log.error("exiting with code %d: %s%s", code, first.reason, f" ({error})" if error else "")
        else:
            log.info("exiting with code %d: %s", code, self.stop_reason)
