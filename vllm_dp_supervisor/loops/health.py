"""The health loops of one rank's attempt: `/health` from its start (every
--startup-probe-interval while it loads, every --probe-interval once ready), and, once ready, the
deep probe: a one-token completion every --deep-probe-interval, because vLLM's /health answers 200
while its engine is stuck.

They only observe and report (observations.py); the machine decides. A loop ends when the machine
says its reports no longer matter (another attempt began, the rank failed, the pod stops).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from vllm_dp_supervisor.core.machine import Machine
from vllm_dp_supervisor.core.observations import DeepProbed, Probed, Squatted
from vllm_dp_supervisor.core.records import RankRecord
from vllm_dp_supervisor.core.states import RankState
from vllm_dp_supervisor.loops.tasks import Tasks
from vllm_dp_supervisor.procs import linux
from vllm_dp_supervisor.server.client import Prober, ProbeResult
from vllm_dp_supervisor.settings.plan import probe_host, url_host

# The least time the last start-up probe gets, however little of --startup-timeout is left.
LAST_PROBE_S = 0.05
# What moving token counters report: the engine works, as well as a completion would say.
_WORKING = ProbeResult(None, 200, 0.0, "its token counters moved")


class Health:
    def __init__(self, machine: Machine, prober: Prober, tasks: Tasks,
                 on_ready: Callable[[RankRecord], None]) -> None:
        """`on_ready`: called when a rank turns ready (its tree is noted while it is whole)."""
        self._machine = machine
        self._config = machine.config
        self._prober = prober
        self._tasks = tasks
        self._on_ready = on_ready
        self._host = url_host(probe_host(machine.config.host))

    def watch(self, record: RankRecord) -> None:
        """Probe the rank's current attempt until the machine says stop."""
        self._tasks.spawn(self._probe_loop(record, record.attempt))

    async def _probe_loop(self, record: RankRecord, attempt: int) -> None:
        cfg, machine, port = self._config, self._machine, record.spec.port
        url = f"http://{self._host}:{port}/health"
        started = time.monotonic()
        next_progress = started + cfg.progress_interval
        while True:
            tick = time.monotonic()
            starting = record.state is RankState.STARTING
            if starting:
                if tick >= next_progress:
                    next_progress += cfg.progress_interval
                    record.log.info("rank %d not ready after %.0f s: %s", record.rank, tick - started,
                                    record.process.output.last_line or "(no output yet)")
                remaining = cfg.startup_timeout - (tick - started)
                result = await self._prober.probe(url, max(LAST_PROBE_S, min(cfg.probe_timeout, remaining)))
                interval = cfg.startup_probe_interval
                # vLLM binds its port early but listens late: whoever answered may be a squatter.
                squatters = record.process.port_squatters(port) if result.status is not None else []
                if squatters and machine.current(record.rank, attempt):
                    machine.report(Squatted(record.rank, attempt, tuple(squatters), linux.describe_pids(squatters)))
                    return
            else:
                result = await self._prober.probe(url, cfg.probe_timeout)
                interval = cfg.probe_interval
            if not machine.report(Probed(record.rank, attempt, result, time.monotonic() - started)):
                return
            if starting and record.state is RankState.READY:
                self._on_ready(record)
                if cfg.deep_probe_interval > 0:
                    self._tasks.spawn(self._deep_probe_loop(record, attempt))
            # The router's word that it could not connect cuts the wait short.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(record.probe_soon.wait(), max(0.0, tick + interval - time.monotonic()))
            record.probe_soon.clear()

    async def _deep_probe_loop(self, record: RankRecord, attempt: int) -> None:
        """Skipped while the rank's token counters move: real traffic proves the engine works."""
        cfg, machine, prober = self._config, self._machine, self._prober
        base = f"http://{self._host}:{record.spec.port}"
        model: str | None = None
        tokens = await prober.token_count(base, cfg.probe_timeout)
        while True:
            await asyncio.sleep(cfg.deep_probe_interval)
            if not machine.current(record.rank, attempt) or record.state not in (RankState.READY,
                                                                                 RankState.RECOVERING):
                return
            if record.state is RankState.RECOVERING:
                continue  # a halted engine answers nothing; the recovery decides, then probing resumes
            now_tokens = await prober.token_count(base, cfg.probe_timeout)
            if now_tokens is not None and tokens is not None and now_tokens > tokens:
                tokens = now_tokens
                machine.report(DeepProbed(record.rank, attempt, _WORKING))
                continue
            if model is None:
                model, result = await prober.model_name(base, cfg.probe_timeout)
            if model is not None:
                result = await prober.probe(f"{base}/v1/completions", cfg.deep_probe_timeout,
                                            {"model": model, "prompt": "ping", "max_tokens": 1})
            if not machine.report(DeepProbed(record.rank, attempt, result)):
                return
            if result.ok:
                tokens = await prober.token_count(base, cfg.probe_timeout)  # ours included
