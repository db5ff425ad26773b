"""The judgment of a stalled rank (the router saw it hold requests and send nothing back): do
its token counters move? A hung engine's do not; one busy with a long prefill's do. Reads the
rank's /metrics every JUDGE_POLL_S for up to JUDGE_S and reports a `Judged` observation; the
machine decides (verdicts.py).
"""

from __future__ import annotations

import asyncio
import time

from vllm_dp_supervisor.core.machine import Machine
from vllm_dp_supervisor.core.observations import Judged
from vllm_dp_supervisor.core.records import RankRecord
from vllm_dp_supervisor.core.states import RankState
from vllm_dp_supervisor.loops.tasks import Tasks
from vllm_dp_supervisor.server.client import Prober
from vllm_dp_supervisor.settings.config import Config

JUDGE_S = 10.0  # with the default --stall-timeout of 3 s: a hung engine is declared in ~13 s
JUDGE_POLL_S = 1.0


class Judge:
    def __init__(self, config: Config, machine: Machine, prober: Prober, tasks: Tasks) -> None:
        self._config = config
        self._machine = machine
        self._prober = prober
        self._tasks = tasks

    def start(self, rank: int, attempt: int) -> None:
        """Carry out the machine's order to judge the rank's attempt (orders.Judge)."""
        self._tasks.spawn(self._judge(self._machine.records[rank], attempt))

    async def _judge(self, record: RankRecord, attempt: int) -> None:
        machine, timeout = self._machine, self._config.probe_timeout
        base = record.spec.url
        first = await self._prober.token_count(base, timeout)
        deadline = time.monotonic() + JUDGE_S
        latest = first
        while time.monotonic() < deadline:
            await asyncio.sleep(JUDGE_POLL_S)
            if not machine.current(record.rank, attempt) or record.state is not RankState.STALLED:
                return
            latest = await self._prober.token_count(base, timeout)
            if first is None:
                first = latest
            elif latest is not None and latest > first:
                machine.report(Judged(record.rank, attempt, True, "its token counters moved"))
                return
        if first is None:
            verdict = Judged(record.rank, attempt, None, "its /metrics has no token counters to judge by")
        else:
            verdict = Judged(record.rank, attempt, False, f"its token counters did not move in {JUDGE_S:g} s")
        machine.report(verdict)
