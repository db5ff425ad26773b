"""The judgment of a stalled rank (the router holds requests there and got nothing back for
--stall-timeout): is its engine working, slowly, or not at all? It watches three things from the
moment of the stall and reports what it sees; the machine decides (verdicts.py):

- the engine's CPU time (procs/work.py), every POLL_S: an engine that holds requests and uses no
  CPU does no work (SIGSTOPped, deadlocked, blocked on a dead peer). After IDLE_S of that it leaves
  rotation (`Idle`); after HUNG_S it is hung. Using CPU (`Busy`), it stays in rotation: a long
  prefill, a first compile, a first logprobs pass (seen on the CPU build: 15.9 s to a first token)
  all look like this. On a GPU the engine's thread spins on the device while a kernel runs, so a
  long prefill uses a core there too; a collective stuck spinning does as well, and only time
  tells it from work: busy for --spin-timeout (60 s) with nothing out is hung.
- its token counters (its /metrics), every TOKENS_EVERY_S: moved means it produced.
- a one-token completion sent at the stall: answered means its engine runs steps (the requests
  the router held may have been cancelled meanwhile, which leaves a healthy engine idle).

Never judges by silence alone, and never blocks: each HTTP read is a task of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable

from vllm_dp_supervisor.core.machine import Machine
from vllm_dp_supervisor.core.observations import Busy, Idle, Judged
from vllm_dp_supervisor.core.records import RankRecord
from vllm_dp_supervisor.core.states import RankState
from vllm_dp_supervisor.loops.spawn import process_of
from vllm_dp_supervisor.loops.tasks import Tasks
from vllm_dp_supervisor.procs import work
from vllm_dp_supervisor.server.client import Prober
from vllm_dp_supervisor.settings.config import Config

POLL_S = 0.1
IDLE_S = 0.3  # no CPU this long: out of rotation (with --stall-timeout 0.5: ~1 s after the last byte)
HUNG_S = 4.0  # no CPU this long: hung (~5 s after the last byte)
BUSY_SHARE = 0.2  # of one core: below it the engine does no work (its idle loop, a probe's answer)
TOKENS_EVERY_S = 1.0
NO_CPU_HUNG_S = 10.0  # when the engine's CPU cannot be read: the token counters and the answer alone

EngineCpu = Callable[[RankRecord], float | None]


def engine_cpu(record: RankRecord) -> float | None:
    """CPU seconds the rank's engine has used (procs/work.py)."""
    return work.engine_cpu_seconds(process_of(record.current).pid)


@dataclasses.dataclass(frozen=True)
class Seen:
    """What one look at a stalled rank found worth reporting."""
    kind: str  # "busy", "idle", or "judged" (the end: progressed says how)
    detail: str
    progressed: bool | None = None

    def observation(self, rank: int, attempt: int) -> Busy | Idle | Judged:
        if self.kind == "busy":
            return Busy(rank, attempt, self.detail)
        if self.kind == "idle":
            return Idle(rank, attempt, self.detail)
        return Judged(rank, attempt, self.progressed, self.detail)


class Watch:
    """One judgment's state, from the stall on: pure (the time and the readings come in)."""

    def __init__(self, start: float, cpu: float | None, spin_s: float) -> None:
        self.start = self.last_work = self._cpu_at = start
        self.spin_s = spin_s
        self._cpu = cpu
        self.hung_s = HUNG_S if cpu is not None else NO_CPU_HUNG_S
        self._said = ""  # the last of "busy" and "idle" said, so each change is said once

    def look(self, now: float, cpu: float | None, produced: str | None) -> Seen | None:
        """A look at `now`: the engine's CPU seconds so far (None: unreadable), and the evidence
        that it produced something, if any came. What to report, or None."""
        if produced is not None:
            return Seen("judged", produced, True)
        share = (cpu - self._cpu) / (now - self._cpu_at) if cpu is not None and self._cpu is not None \
            and now > self._cpu_at else 0.0
        if cpu is not None:
            self._cpu, self._cpu_at = cpu, now
        if share >= BUSY_SHARE:
            self.last_work = now
            if now - self.start >= self.spin_s:
                return Seen("judged", f"its engine spun {self.spin_s:g} s (CPU used, no token counted, no one-token "
                                      "completion answered)", False)
            return self._say("busy", f"its engine works ({share:.0%} of a core)")
        idle = now - self.last_work
        if idle >= self.hung_s:
            what = "used no CPU, counted no token" if self._cpu is not None else "counted no token"
            return Seen("judged", f"its engine {what} and answered no one-token completion for {self.hung_s:g} s",
                        False)
        if idle >= IDLE_S:
            return self._say("idle", f"its engine did no work for {idle:.1f} s")
        return None

    def _say(self, kind: str, detail: str) -> Seen | None:
        if self._said == kind:
            return None
        self._said = kind
        return Seen(kind, detail)


class Judge:
    def __init__(self, config: Config, machine: Machine, prober: Prober, tasks: Tasks,
                 engine_cpu: EngineCpu = engine_cpu) -> None:
        self._config = config
        self._machine = machine
        self._prober = prober
        self._tasks = tasks
        self._engine_cpu = engine_cpu

    def start(self, rank: int, attempt: int) -> None:
        """Carry out the machine's order to judge the rank's attempt (orders.Judge)."""
        self._tasks.spawn(self._judge(self._machine.records[rank], attempt))

    async def _judge(self, record: RankRecord, attempt: int) -> None:
        answer = asyncio.create_task(self._one_token(record.spec.url))
        try:
            await self._watch(record, attempt, answer)
        finally:
            answer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await answer

    async def _watch(self, record: RankRecord, attempt: int, answer: asyncio.Task[bool]) -> None:
        machine, rank, base, timeout = self._machine, record.rank, record.spec.url, self._config.probe_timeout
        watch = Watch(time.monotonic(), self._engine_cpu(record), self._config.spin_timeout)
        first_tokens: float | None = None
        tokens = asyncio.create_task(self._prober.token_count(base, timeout))
        tokens_at = watch.start
        try:
            while True:
                await asyncio.sleep(POLL_S)
                if not machine.current(rank, attempt) or record.state not in (RankState.READY, RankState.STALLED):
                    return
                now, produced = time.monotonic(), None
                if answer.done() and not answer.cancelled() and answer.exception() is None and answer.result():
                    produced = f"it answered a one-token completion in {now - watch.start:.1f} s"
                if tokens.done() and now - tokens_at >= TOKENS_EVERY_S:
                    count = tokens.result() if tokens.exception() is None else None
                    if first_tokens is None:
                        first_tokens = count
                    elif count is not None and count > first_tokens:
                        produced = "its token counters moved"
                    tokens, tokens_at = asyncio.create_task(self._prober.token_count(base, timeout)), now
                seen = watch.look(now, self._engine_cpu(record), produced)
                if seen is not None:
                    machine.report(seen.observation(rank, attempt))
                    if seen.kind == "judged":
                        return
        finally:
            tokens.cancel()

    async def _one_token(self, base: str) -> bool:
        """A one-token completion, answered (True) or not (False, when it fails; never, when hung)."""
        model, _ = await self._prober.model_name(base, self._config.probe_timeout)
        if model is None:
            return False
        result = await self._prober.probe(f"{base}/v1/completions", self._config.spin_timeout,
                                          {"model": model, "prompt": "ping", "max_tokens": 1})
        return result.ok
