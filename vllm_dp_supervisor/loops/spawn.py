"""Spawning a rank's attempt and watching it exit.

A start holds the spawn lock: a stop takes it before it looks at the ranks, so no process can
appear behind its back. The exit is awaited on a pidfd (seen within milliseconds) and reported;
the exit event waits a moment for the server's last words on stderr, so it can carry its error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import cast

from vllm_dp_supervisor.core.events import EventKind
from vllm_dp_supervisor.core.machine import Machine
from vllm_dp_supervisor.core.observations import Exited
from vllm_dp_supervisor.core.records import Attempt, RankRecord
from vllm_dp_supervisor.core.states import SupervisorState
from vllm_dp_supervisor.loops.tasks import Tasks
from vllm_dp_supervisor.output.console import Console
from vllm_dp_supervisor.output.ranks import RankOutput, rank_log_dir
from vllm_dp_supervisor.procs.guard import TreeGuard
from vllm_dp_supervisor.procs.process import RankProcess
from vllm_dp_supervisor.settings import exits
from vllm_dp_supervisor.settings.config import Config, LogFormat
from vllm_dp_supervisor.settings.plan import RankSpec

# After a server exits, how long its stderr gets to deliver its last words to the exit event.
LAST_WORDS_S = 0.5


def make_process(config: Config, spec: RankSpec, attempt: int, *, environ: Mapping[str, str],
                 console: Console | None, log_dir: Path | None) -> RankProcess:
    """A rank's process for one attempt, not started. `log_dir`: the run's directory for rank
    log files (None: keep none)."""
    tee = config.tee is None or spec.rank in config.tee
    output = RankOutput(spec.rank, console if tee else None,
                        log_dir=None if log_dir is None else rank_log_dir(log_dir, spec.rank, attempt),
                        max_bytes=config.log_max_bytes, json_console=config.log_format is LogFormat.JSON)
    return RankProcess(spec, environ, output)


def process_of(attempt: Attempt) -> RankProcess:
    """The attempt's process as the loops made it (`make_process`); the core reads it through
    its `Process` port only."""
    return cast(RankProcess, attempt.process)


def remember_tree(attempt: Attempt, guard: TreeGuard | None) -> None:
    """Note the attempt's descendants and their shared memory while they can still be found, and
    tell the guardian of the memory (it removes it if we die). At readiness: before /ready can say
    200, so the guardian knows the memory of every ready rank."""
    process = process_of(attempt)
    process.remember_descendants()
    if guard is not None:
        guard.cleanup_files(process.shm_paths)


class Spawner:
    def __init__(self, machine: Machine, tasks: Tasks, guard: TreeGuard | None,
                 new_process: Callable[[RankSpec, int], RankProcess],
                 on_started: Callable[[RankRecord, Attempt], None]) -> None:
        """`new_process`: `make_process` for this run. `on_started`: what watches a started
        attempt (the health loops)."""
        self._machine = machine
        self._tasks = tasks
        self._guard = guard
        self.new_process = new_process
        self._on_started = on_started
        self.lock = asyncio.Lock()

    async def start(self, record: RankRecord) -> None:
        """Start the rank's current attempt, unless the pod is stopping."""
        machine, attempt = self._machine, record.current
        process = process_of(attempt)
        async with self.lock:
            if machine.state is not SupervisorState.RUNNING:
                return
            try:
                await process.start()
            except OSError as exc:
                machine.spawn_failed(record, exc)
                return
            machine.spawned(record)
        if self._guard is not None and process.pgid is not None:
            self._guard.guard(process.pgid)
        record.log.info("rank %d started: pid %d, port %d, %s %s", record.rank, process.pid, record.spec.port,
                        "CUDA_VISIBLE_DEVICES" if record.spec.device_kind.value == "cuda" else "cores",
                        record.spec.devices_text or "-")
        self._tasks.spawn(self._watch_exit(record, attempt))
        self._on_started(record, attempt)

    async def _watch_exit(self, record: RankRecord, attempt: Attempt) -> None:
        process = process_of(attempt)
        returncode = await process.wait()
        current = self._machine.current(record.rank, attempt.number)
        self._machine.report(Exited(record.rank, attempt.number, returncode,
                                    process.oom_killed() if returncode == -9 else None))
        if current:  # its engine processes may live on, re-parented to us: note them and their memory,
            # with the scan of /proc (a few ms for a vLLM tree) in a thread: /ready turned 503 a
            # moment ago, and a probe asking now must not wait for the scan
            await asyncio.to_thread(process.remember_descendants)
            if self._guard is not None:
                self._guard.cleanup_files(process.shm_paths)
        await process.drain_output(LAST_WORDS_S, close=False)
        last_error = process.output.last_error()
        self._machine.exit_words(attempt, last_error)
        # its own words only if it failed by itself: a planned stop's shutdown noise is no error
        self._machine.events.publish(EventKind.EXIT, record.rank, exit_code=exits.exit_code(returncode),
                                     outcome=attempt.outcome, last_error=attempt.last_error(),
                                     detected_at=round(process.exited_at or 0.0, 6))
