"""Spawning a rank's attempt and watching it exit.

A start holds the spawn lock: a stop takes it before it looks at the ranks, so no process can
appear behind its back. The exit is awaited on a pidfd (seen within milliseconds) and reported;
the exit event waits a moment for the server's last words on stderr, so it can carry its error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path

from vllm_dp_supervisor.core.machine import Machine
from vllm_dp_supervisor.core.observations import Exited
from vllm_dp_supervisor.core.records import RankRecord
from vllm_dp_supervisor.core.states import SupervisorState
from vllm_dp_supervisor.loops.tasks import Tasks
from vllm_dp_supervisor.output.console import Console
from vllm_dp_supervisor.output.ranks import RankOutput, rank_log_dir
from vllm_dp_supervisor.procs import linux
from vllm_dp_supervisor.procs.process import RankProcess, TreeGuard
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


def remember_tree(record: RankRecord, guard: TreeGuard | None) -> None:
    """Note the rank's descendants and their shared memory while they can still be found, and
    tell the guardian of the memory (it removes it if we die)."""
    record.process.remember_descendants()
    if guard is not None:
        guard.cleanup_files(record.process.shm_paths)


class Spawner:
    def __init__(self, machine: Machine, tasks: Tasks, guard: TreeGuard | None,
                 new_process: Callable[[RankSpec, int], RankProcess],
                 on_started: Callable[[RankRecord], None]) -> None:
        """`new_process`: `make_process` for this run. `on_started`: what watches a started
        rank's attempt (the health loops)."""
        self._machine = machine
        self._tasks = tasks
        self._guard = guard
        self.new_process = new_process
        self._on_started = on_started
        self.lock = asyncio.Lock()

    async def start(self, record: RankRecord) -> None:
        """Start the rank's current attempt, unless the pod is stopping."""
        machine = self._machine
        async with self.lock:
            if machine.state is not SupervisorState.RUNNING:
                return
            try:
                await record.process.start()
            except OSError as exc:
                machine.spawn_failed(record, exc)
                return
            machine.spawned(record)
        if self._guard is not None and record.process.pgid is not None:
            self._guard.guard(record.process.pgid)
        record.log.info("rank %d started: pid %d, port %d, %s %s", record.rank, record.process.pid,
                        record.spec.port, "CUDA_VISIBLE_DEVICES" if record.spec.device_kind.value == "cuda"
                        else "cores", record.spec.devices_text or "-")
        self._tasks.spawn(self._watch_exit(record, record.attempt, record.process))
        self._on_started(record)

    async def _watch_exit(self, record: RankRecord, attempt: int, process: RankProcess) -> None:
        returncode = await process.wait()
        current = self._machine.current(record.rank, attempt)
        self._machine.report(Exited(record.rank, attempt, returncode))
        if current:  # its engine processes may live on, re-parented to us: note them and their memory
            remember_tree(record, self._guard)
        await process.drain_output(LAST_WORDS_S, close=False)
        last_error = process.output.last_error()
        self._machine.exit_words(record, attempt, last_error)
        self._machine.events.publish("exit", record.rank, exit_code=linux.exit_code(returncode),
                                     outcome=record.outcome, last_error=last_error)
