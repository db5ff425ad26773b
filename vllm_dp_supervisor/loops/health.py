"""The health loops of one rank's attempt: `/health` from its start (every
--startup-probe-interval while it loads, every --probe-interval once ready), and, once ready, the
deep probe: a one-token completion every --deep-probe-interval, because vLLM's /health answers 200
while its engine is stuck.

They only observe and report (observations.py); the machine decides. Each loop holds the attempt
it was started for and reads that attempt's state, never the next one's; it ends when the machine
says its reports no longer matter (another attempt began, the rank failed, the pod stops).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Protocol

from vllm_dp_supervisor.core.machine import Machine
from vllm_dp_supervisor.core.observations import DeepProbed, Probed, Squatted
from vllm_dp_supervisor.core.records import Attempt, RankRecord
from vllm_dp_supervisor.core.states import RankState
from vllm_dp_supervisor.loops.spawn import process_of
from vllm_dp_supervisor.loops.tasks import Tasks
from vllm_dp_supervisor.procs import linux
from vllm_dp_supervisor.server.probes import ProbeResult, one_token
from vllm_dp_supervisor.settings.config import Config

# The least time the last start-up probe gets, however little of --startup-timeout is left.
LAST_PROBE_S = 0.05
# What moving token counters report: the engine works, as well as a completion would say.
_WORKING = ProbeResult(None, 200, 0.0, "its token counters moved")


# While a rank starts, its progress (CPU time, output, what it waits on in the kernel) is read
# this often, off the loop, for /status and the "not ready after" line.
START_SAMPLE_S = 5.0
# A start that used no CPU and wrote nothing this long is said to be stuck, with its kernel wait.
STUCK_S = 30.0


def _stuck(sample: dict | None) -> str:
    """What the "not ready after" line adds for a start that makes no progress."""
    if sample is None or sample["no_progress_for_s"] < STUCK_S:
        return ""
    wait = f", asleep in the kernel at {sample['wchan']}" if sample["wchan"] else ""
    return (f"; no CPU used and no output for {sample['no_progress_for_s']:.0f} s (its server's state "
            f"{sample['state']}{wait})")


class HealthProber(Protocol):
    """What the health loops ask of a rank (server/client.py's `Prober`)."""
    async def probe(self, url: str, timeout: float, json_body: dict | None = None) -> ProbeResult: ...
    async def token_count(self, base_url: str, timeout: float) -> float | None: ...
    async def model_name(self, base_url: str, timeout: float) -> tuple[str | None, ProbeResult]: ...


class Health:
    def __init__(self, config: Config, machine: Machine, prober: HealthProber, tasks: Tasks,
                 on_ready: Callable[[Attempt], None], clock: Callable[[], float] = time.monotonic) -> None:
        """`on_ready`: called when an attempt turns ready (its tree is noted while it is whole)."""
        self._config = config
        self._machine = machine
        self._prober = prober
        self._tasks = tasks
        self._on_ready = on_ready
        self._clock = clock

    def watch(self, record: RankRecord, attempt: Attempt) -> None:
        """Probe the attempt until the machine says stop."""
        self._tasks.spawn(self._probe_loop(record, attempt))

    async def _probe_loop(self, record: RankRecord, attempt: Attempt) -> None:
        cfg, machine, clock = self._config, self._machine, self._clock
        url = f"{record.spec.url}/health"
        started = clock()
        next_progress = started + cfg.progress_interval
        next_sample, sample = started, None
        while machine.current(record.rank, attempt.number):
            tick = clock()
            starting = attempt.state is RankState.STARTING
            if starting:
                if tick >= next_sample:
                    next_sample = tick + START_SAMPLE_S
                    sample = await asyncio.to_thread(process_of(attempt).sample_start)
                if tick >= next_progress:
                    next_progress += cfg.progress_interval
                    record.log.info("rank %d not ready after %.0f s: %s%s", record.rank, tick - started,
                                    attempt.process.output.last_line or "(no output yet)", _stuck(sample))
                remaining = cfg.startup_timeout - (tick - started)
                result = await self._prober.probe(url, max(LAST_PROBE_S, min(cfg.probe_timeout, remaining)))
                interval = cfg.startup_probe_interval
                # vLLM binds its port early but listens late: whoever answered may be a squatter.
                squatters = process_of(attempt).port_squatters(record.spec.port) if result.status is not None else []
                if squatters and machine.current(record.rank, attempt.number):
                    machine.report(Squatted(record.rank, attempt.number, tuple(squatters),
                                            linux.describe_pids(squatters)))
                    return
            else:
                result = await self._prober.probe(url, cfg.probe_timeout)
                interval = cfg.probe_interval
            if not machine.report(Probed(record.rank, attempt.number, result, clock() - started)):
                return
            if starting and attempt.state is RankState.READY:
                self._on_ready(attempt)
                if cfg.deep_probe_interval > 0:
                    self._tasks.spawn(self._deep_probe_loop(record, attempt))
            # The router's word that it could not connect cuts the wait short.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(attempt.probe_soon.wait(), max(0.0, tick + interval - clock()))
            attempt.probe_soon.clear()

    async def _deep_probe_loop(self, record: RankRecord, attempt: Attempt) -> None:
        """Skipped while the rank's token counters move: real traffic proves the engine works."""
        cfg, machine, prober = self._config, self._machine, self._prober
        base = record.spec.url
        model: str | None = None
        tokens = await prober.token_count(base, cfg.probe_timeout)
        while True:
            await asyncio.sleep(cfg.deep_probe_interval)
            if not machine.current(record.rank, attempt.number) or attempt.state not in (
                    RankState.READY, RankState.RECOVERING, RankState.STALLED):
                return
            if attempt.state is not RankState.READY or attempt.judging:
                continue  # a halted or judged engine: the recovery or the judge decides, then probing resumes
            now_tokens = await prober.token_count(base, cfg.probe_timeout)
            if now_tokens is not None and tokens is not None and now_tokens > tokens:
                tokens = now_tokens
                machine.report(DeepProbed(record.rank, attempt.number, _WORKING))
                continue
            if model is None:
                model, result = await prober.model_name(base, cfg.probe_timeout)
            if model is not None:
                result = await prober.probe(f"{base}/v1/completions", cfg.deep_probe_timeout,
                                            one_token(model))
            if not machine.report(DeepProbed(record.rank, attempt.number, result)):
                return
            if result.ok:
                tokens = await prober.token_count(base, cfg.probe_timeout)  # ours included
