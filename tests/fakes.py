"""In-process stand-ins for the unit tests of the core and the loops: a fake clock, fake
processes (a pid and an output, what the core reads through its `Process` port), and `Pod`, a
real machine over them with the real Prometheus counters, which reads the machine's orders from
its queue instead of carrying them out."""

from __future__ import annotations

import signal
from collections import deque
from pathlib import Path

from vllm_dp_supervisor.api.metrics import PodMetrics
from vllm_dp_supervisor.api.status import status
from vllm_dp_supervisor.core.machine import Machine
from vllm_dp_supervisor.core.observations import Exited, Probed
from vllm_dp_supervisor.core.orders import Judge, Restart, Rollout
from vllm_dp_supervisor.core.records import RankGroup, RankRecord
from vllm_dp_supervisor.core.states import RankState
from vllm_dp_supervisor.server.probes import ProbeFailure, ProbeResult
from vllm_dp_supervisor.settings.options import parse_config
from vllm_dp_supervisor.settings.plan import Inventory, plan_ranks

OK = ProbeResult(None, 200, 1.0)
REFUSED = ProbeResult(ProbeFailure.REFUSED, None, 1.0, "connection refused")
TIMEOUT = ProbeResult(ProbeFailure.TIMEOUT, None, 1.0, "no answer in 5 s")
FT = ("--enable-fault-tolerance",)
UNAUTHORIZED = ProbeResult(ProbeFailure.STATUS, 401, 1.0, "HTTP 401")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeOutput:
    def __init__(self) -> None:
        self.last_line = "INFO started"
        self.stderr_tail = deque(["Traceback ...", "RuntimeError: CUDA out of memory"])
        self.log_dir: Path | None = None
        self.error: str | None = "RuntimeError: CUDA out of memory"  # what last_error finds

    def last_error(self) -> str | None:
        return self.error


class FakeProcess:
    """What the machine reads of a process: its pid and its output (and, for the health loop, a
    port nobody squats)."""
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.output = FakeOutput()
        self.started_monotonic = 0.0
        self.started_at = 0.0
        self.returncode = None
        self.starting_readout: dict | None = None
        self.samples: list[dict] = []  # what sample_start returns, in turn (the last one stays)

    def port_squatters(self, port: int) -> list[int]:
        return []

    def sample_start(self) -> dict | None:
        """As RankProcess's: the scripted readouts, in turn."""
        if self.samples:
            self.starting_readout = self.samples.pop(0) if len(self.samples) > 1 else self.samples[0]
        return self.starting_readout


class Pod:
    """A machine over fake ranks, and what it ordered."""
    def __init__(self, *options: str, ranks: int = 2, server: tuple[str, ...] = ()) -> None:
        config = parse_config(["--dp-size-local", str(ranks), *options, "--", "m", *server], {})
        specs = plan_ranks(config, Inventory(gpus=(), cpus=(0, 1)))
        self.clock = Clock()
        self.pids = iter(range(100, 10**6))
        self.metrics = PodMetrics(ranks, config.mode.value, config.startup_timeout)
        self.machine = Machine(config, [RankRecord(s, FakeProcess(next(self.pids))) for s in specs], self.metrics,
                               clock=self.clock, wall_clock=self.clock, jitter=lambda: 0.5)
        self._restarts: list[tuple[list[int], float, str]] = []
        self._drains: list[bool] = []  # per restart: whether its ranks are drained first
        self._rollouts = 0
        self._judged: list[int] = []
        self.exited: set[tuple[int, int]] = set()

    def _take_orders(self) -> None:
        for order in self.machine.orders.taken():
            if isinstance(order, Restart):
                self._restarts.append((order.group.ranks, order.delay_s, order.why))
                self._drains.append(order.drain)
            elif isinstance(order, Rollout):
                self._rollouts += 1
            elif isinstance(order, Judge):
                self._judged.append(order.rank)

    @property
    def restarts(self) -> list[tuple[list[int], float, str]]:
        self._take_orders()
        return self._restarts

    @property
    def drains(self) -> list[bool]:
        self._take_orders()
        return self._drains

    @property
    def rollouts(self) -> int:
        self._take_orders()
        return self._rollouts

    @property
    def judged(self) -> list[int]:
        self._take_orders()
        return self._judged

    def status(self) -> dict:
        return status(self.machine, None, rank_logs=True)

    def record(self, rank: int) -> RankRecord:
        return self.machine.records[rank]

    def report(self, kind: type, rank: int, *args: object) -> bool:
        if kind is Exited:  # a process exits once: its pidfd reports once
            assert (rank, self.record(rank).attempt) not in self.exited
            self.exited.add((rank, self.record(rank).attempt))
        return self.machine.report(kind(rank, self.record(rank).attempt, *args))

    def ready(self, *ranks: int) -> None:
        for rank in ranks or range(len(self.machine.records)):
            assert self.report(Probed, rank, OK, 20.0)
            assert self.record(rank).state is RankState.READY

    def restart(self, group: RankGroup) -> None:
        """What restart.py does, through the same verbs: drain, stop, back off, a new attempt."""
        if self.drains and self.drains[-1]:
            for r in group.records:
                self.machine.draining_rank(r)
        for r in group.records:
            self.machine.stopping(r, signal.SIGTERM)
            if (r.rank, r.attempt) not in self.exited:
                self.report(Exited, r.rank, -signal.SIGTERM)
            self.machine.backoff(r, 1.0, "test")
            self.machine.new_attempt(r, FakeProcess(next(self.pids)))
        self.machine.restart_done(group)

    def events(self, kind: str) -> list[dict]:
        return [e.as_dict() for e in self.machine.events.since(0) if e.kind == kind]


