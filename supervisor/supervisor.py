"""The state machine: the only writer of rank state, and the result collector.

Events reach it three ways, all on the event loop: a rank's exit (an awaited wait on a pidfd, so
it is seen within milliseconds), a probe result, and a signal (the handler only queues it; the
loop dispatches to `handle_<name>`). Every state change goes through `change_state`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import signal
import time
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any

from . import linux
from .config import Config, LogFormat, effective_stop_timeout
from .events import EventLog
from .logs import Console, RankOutput, rank_log_dir
from .metrics import Metrics
from .plan import RankSpec, probe_host, url_host
from .probe import Prober, ProbeResult
from .rank import RankProcess, TreeGuard
from .states import RankState, SupervisorState, check_rank_transition, check_supervisor_transition

log = logging.getLogger("supervisor")

# After SIGKILL, how long the kernel gets to tear the trees down before we report survivors.
KILL_GRACE_S = 5.0
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


@dataclasses.dataclass
class RankRecord:
    """What the supervisor knows of one rank. Written only by `Supervisor`."""
    spec: RankSpec
    process: RankProcess
    state: RankState = RankState.STARTING
    consecutive_failures: int = 0
    last_probe_ms: float | None = None
    last_probe_error: str | None = None
    ready_after_s: float | None = None
    outcome: str | None = None
    exit_code: int | None = None
    ended_monotonic: float | None = None
    killed_by_supervisor: bool = False
    failure_reason: str | None = None  # set when the rank failed by itself, not by our stop

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


class Supervisor:
    def __init__(self, config: Config, specs: Sequence[RankSpec], *, environ: Mapping[str, str],
                 guard: TreeGuard | None = None, console: Console | None = None,
                 run_dir: Path | None = None, log_dir: Path | None = None) -> None:
        """`log_dir`: this run's directory for rank log files (None: keep none)."""
        self.config = config
        self.stop_timeout = effective_stop_timeout(config)
        self.log_dir = log_dir
        self.records = [RankRecord(spec, RankProcess(spec, environ, self._rank_output(spec.rank, console)))
                        for spec in specs]
        self.run_dir = run_dir
        self.events = EventLog()
        self.state = SupervisorState.RUNNING
        self.stop_reason: str | None = None
        self.failures: list[Failure] = []
        self._guard = guard
        self._stop_signal = signal.SIGTERM
        self._stop_requested = asyncio.Event()
        self._kill_now = asyncio.Event()
        self._signals: asyncio.Queue[int] = asyncio.Queue()
        self._tasks: set[asyncio.Task] = set()
        self._host = url_host(probe_host(config.host))
        # Last: its collector reads the state above.
        self.metrics = Metrics(self.status, len(specs))

    def _rank_output(self, rank: int, console: Console | None) -> RankOutput:
        tee = self.config.tee is None or rank in self.config.tee
        return RankOutput(rank, console if tee else None,
                          log_dir=None if self.log_dir is None else rank_log_dir(self.log_dir, rank),
                          max_bytes=self.config.log_max_bytes,
                          json_console=self.config.log_format is LogFormat.JSON)

    # ---- the only writers of state ----

    def change_state(self, record: RankRecord, new: RankState, why: str) -> None:
        check_rank_transition(record.state, new)
        old, record.state = record.state, new
        level = logging.INFO if new in (RankState.READY, RankState.STOPPING) else logging.WARNING
        if new is RankState.EXITED and self.state is not SupervisorState.RUNNING:
            level = logging.INFO
        record.log.log(level, "rank %d %s: %s", record.rank, new.value, why)
        self.events.publish("state", record.rank, old=old.value, new=new.value, why=why)

    def _change_supervisor_state(self, new: SupervisorState, why: str) -> None:
        check_supervisor_transition(self.state, new)
        self.state = new
        log.info("supervisor %s: %s", new.value, why)
        self.events.publish("supervisor", None, new=new.value, why=why)

    # ---- what the API reads ----

    @property
    def ready(self) -> bool:
        return self.state is SupervisorState.RUNNING and all(
            r.state is RankState.READY for r in self.records)

    @property
    def live(self) -> bool:
        return self.state is SupervisorState.RUNNING

    @staticmethod
    def _starting_for(record: RankRecord) -> float | None:
        start = record.process.started_monotonic
        if record.state is not RankState.STARTING or start is None:
            return None
        return round(time.monotonic() - start, 3)

    @staticmethod
    def _last_error(record: RankRecord) -> str | None:
        return record.process.output.last_error() if record.failure_reason else None

    def not_ready(self) -> list[dict[str, Any]]:
        return [{"rank": r.rank, "state": r.state.value} for r in self.records
                if r.state is not RankState.READY]

    def status(self) -> dict[str, Any]:
        # Deliberately no argv and no environment: they carry API keys and tokens.
        return {
            "ready": self.ready,
            "stopping": self.state is not SupervisorState.RUNNING,
            "state": self.state.value,
            "stop_reason": self.stop_reason,
            "ranks": [{
                "rank": r.rank,
                "port": r.spec.port,
                "pid": r.process.pid,
                "state": r.state.value,
                "devices": r.spec.devices_text,
                "consecutive_failures": r.consecutive_failures,
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

    def handle_chld(self) -> None:
        self.reap_orphans()

    def reap_orphans(self) -> None:
        """Reap, by pid, children asyncio does not own: engines orphaned to us as subreaper."""
        owned = {r.process.pid for r in self.records if r.process.pid is not None}
        if self._guard is not None and self._guard.pid is not None:
            owned.add(self._guard.pid)
        for pid, returncode in linux.reap_orphans(owned):
            log.debug("reaped orphan pid %d (%s)", pid, linux.describe_exit(returncode))

    # ---- stopping ----

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
        record.failure_reason = reason
        if self.state is not SupervisorState.RUNNING:
            return  # the stop under way was decided by an earlier event
        self.failures.append(Failure(time.monotonic(), record.rank, code, reason))
        self.request_stop(reason, signal.SIGTERM)

    async def _stop_all(self) -> None:
        sig = self._stop_signal
        started = [r for r in self.records if r.process.pid is not None]
        for record in started:
            if record.state in (RankState.STARTING, RankState.READY, RankState.UNHEALTHY):
                self.change_state(record, RankState.STOPPING, f"sent {signal.Signals(sig).name}")
            record.process.remember_descendants()
            record.process.send(sig)
            # A stopped (SIGSTOP) process only acts on the signal once continued.
            record.process.send(signal.SIGCONT)
        if not await self._wait_trees_gone(started, self.stop_timeout, interruptible=True):
            for record in started:
                if record.process.tree_alive():
                    pids = record.process.survivors()
                    why = "second signal" if self._kill_now.is_set() else \
                        f"still running after --stop-timeout {self.stop_timeout:g} s"
                    record.log.warning("rank %d: %s; SIGKILL to pids %s", record.rank, why, pids)
                    record.killed_by_supervisor = True
                    record.process.send(signal.SIGKILL)
            if not await self._wait_trees_gone(started, KILL_GRACE_S, interruptible=False):
                for record in started:
                    if record.process.tree_alive():
                        record.log.error("rank %d: pids %s survived SIGKILL for %g s (uninterruptible "
                                  "sleep in the kernel?)", record.rank, record.process.survivors(),
                                  KILL_GRACE_S)
        for record in started:
            if record.process.tree_alive():
                continue
            removed = record.process.remove_shm()
            if removed:
                record.log.info("rank %d: removed shared memory %s", record.rank, " ".join(removed))
            if self._guard is not None:
                self._guard.release(record.process.pgid)
        await asyncio.gather(*(r.process.drain_output(DRAIN_S) for r in started))
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    async def _wait_trees_gone(self, records: list[RankRecord], timeout: float, *, interruptible: bool) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self.reap_orphans()
            if all(r.process.returncode is not None and not r.process.tree_alive() for r in records):
                return True
            if time.monotonic() >= deadline or (interruptible and self._kill_now.is_set()):
                return False
            await asyncio.sleep(TEARDOWN_POLL_S)

    # ---- ranks ----

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_rank(self, record: RankRecord) -> None:
        try:
            await record.process.start()
        except OSError as exc:
            record.outcome = f"could not start: {exc.strerror or exc}"
            record.exit_code = 127
            record.state = RankState.EXITED  # never ran: no edge to walk
            record.log.error("rank %d %s", record.rank, record.outcome)
            self._fail(record, 127, f"rank {record.rank} {record.outcome}")
            return
        if self._guard is not None:
            self._guard.guard(record.process.pgid)
        record.log.info("rank %d started: pid %d, port %d, %s %s", record.rank, record.process.pid,
                 record.spec.port, "CUDA_VISIBLE_DEVICES" if record.spec.device_kind.value == "cuda"
                 else "cores", record.spec.devices_text or "-")
        self._spawn_task(self._watch_exit(record))
        self._spawn_task(self._probe_loop(record))

    async def _watch_exit(self, record: RankRecord) -> None:
        returncode = await record.process.wait()
        self._on_exit(record, returncode)
        # The state change went out at once; the exit event waits a moment for the last words
        # the server wrote to stderr before it died, so it can carry its error.
        await record.process.drain_output(LAST_WORDS_S, close=False)
        self.events.publish("exit", record.rank, exit_code=record.exit_code, outcome=record.outcome,
                            last_error=record.process.output.last_error())

    def _remember_tree(self, record: RankRecord) -> None:
        record.process.remember_descendants()
        if self._guard is not None:
            self._guard.cleanup_files(record.process.shm_paths)

    def _on_exit(self, record: RankRecord, returncode: int) -> None:
        record.ended_monotonic = time.monotonic()
        # Its engine processes may live on, re-parented to us: note them and their shared memory.
        self._remember_tree(record)
        record.exit_code = linux.exit_code(returncode)
        failed_by_itself = False
        if record.killed_by_supervisor and returncode == -signal.SIGKILL:
            record.outcome = "killed by SIGKILL from the supervisor"
            reason = "killed_by_supervisor"
        elif self.state is SupervisorState.RUNNING:
            failed_by_itself = True
            record.outcome = linux.describe_exit(returncode)
            reason = "signal" if returncode < 0 else "exit_code"
            if returncode == 0:
                record.outcome += " by itself (a server that ends on its own has failed)"
                reason = "exit_zero"
        else:
            record.outcome = f"stopped ({linux.describe_exit(returncode)})"
            reason = "stopped"
        self.metrics.exits.labels(str(record.rank), reason).inc()
        self.change_state(record, RankState.EXITED, record.outcome)
        if failed_by_itself:
            code = record.exit_code if record.exit_code != 0 else EXIT_FAILED
            self._fail(record, code, f"rank {record.rank} {record.outcome}")

    async def _probe_loop(self, record: RankRecord) -> None:
        url = f"http://{self._host}:{record.spec.port}/health"
        cfg = self.config
        started = time.monotonic()
        next_progress = started + cfg.progress_interval
        while record.state in (RankState.STARTING, RankState.READY):
            tick = time.monotonic()
            if record.state is RankState.STARTING:
                remaining = cfg.startup_timeout - (tick - started)
                if remaining <= 0:
                    self._on_startup_timeout(record)
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
            self._on_probe(record, result, time.monotonic() - started)
            await asyncio.sleep(max(0.0, tick + interval - time.monotonic()))

    def _on_probe(self, record: RankRecord, result: ProbeResult, since_start: float) -> None:
        if record.state not in (RankState.STARTING, RankState.READY):
            return  # the rank moved on while the probe was in flight
        rank = str(record.rank)
        self.metrics.probe_duration.labels(rank).observe(result.elapsed_ms / 1000)
        if result.failure is not None:
            self.metrics.probe_failures.labels(rank, result.failure.value).inc()
        record.last_probe_ms = result.elapsed_ms
        record.last_probe_error = None if result.ok else result.detail
        if result.ok:
            record.consecutive_failures = 0
            if record.state is RankState.STARTING:
                if not self._answered_by_rank(record):
                    return
                record.ready_after_s = since_start
                self.change_state(record, RankState.READY, f"ready after {since_start:.1f} s")
                self._remember_tree(record)
                if self.ready:
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
            reason = (f"rank {record.rank} unhealthy: {record.consecutive_failures} probes failed in "
                      f"a row (last: {result.detail})")
            self.change_state(record, RankState.UNHEALTHY, reason)
            self._fail(record, EXIT_FAILED, reason)

    def _answered_by_rank(self, record: RankRecord) -> bool:
        """A probe counts only if the rank's own tree listens on its port; else start-up fails.

        vLLM binds its port early but listens late: another program can take the port meanwhile,
        and would otherwise answer the probes for it.
        """
        owned = record.process.owns_listener(record.spec.port)
        if owned is not False:
            return True
        from .preflight import who_listens
        reason = (f"rank {record.rank}: port {record.spec.port} is answered by {who_listens(record.spec.port)}, "
                  "not by the rank's server")
        self.change_state(record, RankState.UNHEALTHY, reason)
        self._fail(record, EXIT_FAILED, reason)
        return False

    def _on_startup_timeout(self, record: RankRecord) -> None:
        reason = (f"rank {record.rank} not ready after --startup-timeout {self.config.startup_timeout:g} s"
                  + (f" (last probe: {record.last_probe_error})" if record.last_probe_error else ""))
        self.change_state(record, RankState.UNHEALTHY, reason)
        self._fail(record, EXIT_FAILED, reason)

    # ---- the whole run ----

    async def run(self) -> int:
        dispatcher = asyncio.ensure_future(self._dispatch_signals())
        try:
            async with Prober() as self._prober:
                for record in self.records:
                    if self.state is not SupervisorState.RUNNING:
                        break
                    await self._start_rank(record)
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
        log.info("%-4s %-8s %-6s %-5s %-9s %s", "rank", "pid", "port", "exit", "ran", "outcome")
        for r in self.records:
            ran = r.run_time_s()
            outcome = r.outcome or r.state.value
            error = self._last_error(r)
            r.log.info("%-4d %-8s %-6d %-5s %-9s %s%s", r.rank, r.process.pid or "-", r.spec.port,
                     "-" if r.exit_code is None else r.exit_code,
                     "-" if ran is None else f"{ran:.1f}s", outcome, f"; last error: {error}" if error else "")
        if self.log_dir is not None:
            log.info("rank logs: %s", self.log_dir)
        if self.failures:
            first = min(self.failures, key=lambda f: f.at)
            error = self.records[first.rank].process.output.last_error()
            log.error("exiting with code %d: %s%s", code, first.reason, f" ({error})" if error else "")
        else:
            log.info("exiting with code %d: %s", code, self.stop_reason)

