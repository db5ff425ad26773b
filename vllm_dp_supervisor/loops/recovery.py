"""vLLM's in-engine recovery (--enable-fault-tolerance), with the supervisor as its orchestrator.

A watch polls each ready rank's /fault_tolerance/status. A faulted engine is reported; when the
machine takes its group out of service, a recovery sends `retry` to every rank of the group and
waits for all of them to be healthy again, then reports how it ended. If it failed or timed out,
the machine falls back to the restart policy.
"""

from __future__ import annotations

import asyncio
import time

from vllm_dp_supervisor.core.machine import Machine
from vllm_dp_supervisor.core.observations import Faulted, RecoveryEnded
from vllm_dp_supervisor.core.records import RankRecord
from vllm_dp_supervisor.core.states import RankState, SupervisorState
from vllm_dp_supervisor.loops.tasks import Tasks
from vllm_dp_supervisor.server.client import Prober
from vllm_dp_supervisor.settings.config import Config

RECOVERY_POLL_S = 0.2


class Recovery:
    def __init__(self, config: Config, machine: Machine, prober: Prober, tasks: Tasks) -> None:
        self._config = config
        self._machine = machine
        self._prober = prober
        self._tasks = tasks

    async def watch(self) -> None:
        machine = self._machine
        while machine.state is SupervisorState.RUNNING:
            await asyncio.sleep(self._config.probe_interval)
            for record in machine.records:
                if record.state is not RankState.READY or record.group.restarting:
                    continue
                attempt = record.attempt
                faulted = await self._faulted(record)
                if faulted and machine.report(Faulted(record.rank, attempt, tuple(faulted))):
                    self._tasks.spawn(self._recover(record, attempt, faulted))

    async def _faulted(self, record: RankRecord) -> list[dict]:
        status = await self._prober.get_json(f"{record.spec.url}/fault_tolerance/status", self._config.probe_timeout)
        engines = status.get("engines", []) if isinstance(status, dict) else []
        return [e for e in engines if isinstance(e, dict) and e.get("status") != "healthy"]

    async def _recover(self, record: RankRecord, attempt: int, faulted: list[dict]) -> None:
        why_not = await self._retry(record.group.records, faulted)
        self._machine.report(RecoveryEnded(record.rank, attempt, why_not))

    async def _retry(self, group: list[RankRecord], faulted: list[dict]) -> str | None:
        """None once every engine of the group is healthy again, else why not."""
        cfg = self._config
        if any(e.get("status") == "dead" for e in faulted):
            return "an engine is dead, not recoverable"
        for r in group:
            code = await self._prober.post_json(f"{r.spec.url}/fault_tolerance/apply", {"instruction": "retry"},
                                                cfg.probe_timeout)
            if code not in (200, 202):
                return f"rank {r.rank} answered the retry with {code or 'nothing'}"
        deadline = time.monotonic() + cfg.ft_recovery_timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(RECOVERY_POLL_S)
            if self._machine.state is not SupervisorState.RUNNING:
                return "the supervisor is stopping"
            pending = []
            for r in group:
                bad = await self._faulted(r)
                errors = [e["ft_error"] for e in bad if e.get("ft_error")]
                if errors or any(e.get("status") == "dead" for e in bad):
                    return f"rank {r.rank}: " + (errors[0] if errors else "an engine died")
                pending += bad
            if not pending:
                return None
        return f"not healthy {cfg.ft_recovery_timeout:g} s after the retry (--ft-recovery-timeout)"
