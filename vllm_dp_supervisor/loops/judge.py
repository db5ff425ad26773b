"""The judgment of a stalled rank (the router holds requests there and got nothing back for
--stall-timeout): is its engine working, slowly, or not at all? It watches from the moment of the
stall and reports what it sees; the machine decides (verdicts.py):

- the engine's CPU time (procs/work.py: its processes and the children they ran), every POLL_S.
  Using CPU (`Busy`), it stays in rotation: a long prefill, a first compile, a first logprobs pass
  (seen on the CPU build: up to 20 s to a first token, torch.compile's C++ compilers below the
  worker). Using none for IDLE_S (`Idle`), it leaves rotation and its streams go elsewhere: cheap,
  and undone as soon as it works again.
- whether a process of its tree is stopped (state T: SIGSTOP; a tracer's `t` is not counted, see
  procs/work.py): stopped on STOPPED_LOOKS looks in a row, it leaves rotation whatever CPU the
  rest of the tree still burns (vLLM's workers busy-poll their queue ~0.5 s after the engine
  stops: waiting for that to end made leaving take 1.3 s); idle and stopped for HUNG_S, it is
  hung: a stopped process does nothing until resumed. Looks, not time: a look that came late
  is still one look.
- its token counters (its /metrics), every TOKENS_EVERY_S, and a one-token completion sent at
  the stall: either moving means it produced (the requests the router held may have been
  cancelled meanwhile, which leaves a healthy engine idle).

Idle but not stopped is not enough to kill: seen here, a fresh rank's first logprobs pass waited
idle for ~5 s on torch.compile's cache lock while the other rank compiled the same kernels. Such
a rank, and one busy without output (a collective stuck spinning looks like a long prefill), is
hung after --hang-timeout (300 s) with nothing out. Never judges by silence alone, and never
blocks: each HTTP read is a task of its own.
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
from vllm_dp_supervisor.server.probes import one_token
from vllm_dp_supervisor.settings.config import Config

POLL_S = 0.1
IDLE_S = 0.2  # no CPU this long: out of rotation (with --stall-timeout 0.3: under 1 s after the last byte)
STOPPED_LOOKS = 2  # a process seen stopped on this many looks in a row: out of rotation
HUNG_S = 3.5  # stopped and idle this long: hung (~4 s after the last byte)
BUSY_SHARE = 0.2  # of one core: below it the engine does no work (its idle loop, a probe's answer)
TOKENS_EVERY_S = 1.0

EngineCpu = Callable[[RankRecord], tuple[float | None, bool]]


def engine_cpu(record: RankRecord) -> tuple[float | None, bool]:
    """CPU seconds the rank's engine has used, and whether a process of its tree is stopped
    (procs/work.py)."""
    return work.reading(process_of(record.current).pid)


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

    def __init__(self, start: float, cpu: float | None, hang_s: float) -> None:
        self.start = self.last_work = self._cpu_at = self._running_at = start
        self._cpu = cpu
        self.hang_s = hang_s
        self._said = ""  # the last of "busy" and "idle" said, so each change is said once
        self._stopped_looks = 0  # looks in a row that saw a process of the tree stopped

    def look(self, now: float, cpu: float | None, stopped: bool, produced: str | None) -> Seen | None:
        """A look at `now`: the engine's CPU seconds so far (None: unreadable), whether a process
        of its tree is stopped, and the evidence that it produced something, if any came. What to
        report, or None."""
        if produced is not None:
            return Seen("judged", produced, True)
        share = (cpu - self._cpu) / (now - self._cpu_at) if cpu is not None and self._cpu is not None \
            and now > self._cpu_at else 0.0
        if cpu is not None:
            self._cpu, self._cpu_at = cpu, now
        if not stopped:
            self._running_at = now
        self._stopped_looks = self._stopped_looks + 1 if stopped else 0
        stopped_for = now - self._running_at
        if share >= BUSY_SHARE:
            self.last_work = now
        elif stopped_for >= HUNG_S and now - self.last_work >= HUNG_S:
            return Seen("judged", f"a process of its engine is stopped (SIGSTOP) and "
                                  f"did no work for {HUNG_S:g} s", False)
        if now - self.start >= self.hang_s:
            how = "busy (CPU used)" if share >= BUSY_SHARE else "idle"
            return Seen("judged", f"its engine produced nothing for {self.hang_s:g} s, {how}: no token counted, no "
                                  "one-token completion answered", False)
        if self._stopped_looks >= STOPPED_LOOKS:
            return self._say("idle", f"a process of its engine is stopped (for {stopped_for:.1f} s)")
        if share >= BUSY_SHARE:
            return self._say("busy", f"its engine works ({share:.0%} of a core)")
        if now - self.last_work >= IDLE_S:
            return self._say("idle", f"its engine did no work for {now - self.last_work:.1f} s")
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
        watch = Watch(time.monotonic(), self._engine_cpu(record)[0], self._config.hang_timeout)
        first_tokens: float | None = None
        tokens = asyncio.create_task(self._prober.token_count(base, timeout))
        tokens_at = watch.start
        try:
            while True:
                await asyncio.sleep(POLL_S)
                if not machine.current(rank, attempt):
                    return
                if record.state not in (RankState.READY, RankState.STALLED):  # recovering, draining, stopping
                    machine.report(Judged(rank, attempt, None, f"it left rotation as {record.state.value}"))
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
                seen = watch.look(now, *self._engine_cpu(record), produced)
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
        result = await self._prober.probe(f"{base}/v1/completions", self._config.hang_timeout,
                                          one_token(model))
        return result.ok
