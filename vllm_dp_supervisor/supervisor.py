"""The composition root: what one run is made of, and the order it starts and stops in.

`serve` is the only place both orders are written. `Supervisor` wires the state machine
(machine.py) to the loops that feed it observations (spawn and exit watch, health, recovery,
signals) and the mechanisms that carry out its verdicts (teardown, the restart sequence); its
`run` is the policy on one screen: start the router and every rank, wait for a stop, drain the
router, stop every rank, report.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vllm_dp_supervisor.api.metrics import PodMetrics, StateCollector
from vllm_dp_supervisor.api.rank_metrics import RankMetrics
from vllm_dp_supervisor.api.status import status
from vllm_dp_supervisor.core.machine import Machine
from vllm_dp_supervisor.core.orders import Judge as JudgeOrder
from vllm_dp_supervisor.core.orders import Restart, Rollout
from vllm_dp_supervisor.core.records import RankRecord
from vllm_dp_supervisor.core.result import ExitResult
from vllm_dp_supervisor.loops.health import Health
from vllm_dp_supervisor.loops.judge import Judge
from vllm_dp_supervisor.loops.recovery import Recovery
from vllm_dp_supervisor.loops.restart import Restarter
from vllm_dp_supervisor.loops.rollout import Rollout as RollingRestart
from vllm_dp_supervisor.loops.signals import Signals
from vllm_dp_supervisor.loops.spawn import Spawner, make_process, remember_tree
from vllm_dp_supervisor.loops.tasks import Tasks
from vllm_dp_supervisor.loops.teardown import Teardown
from vllm_dp_supervisor.output.console import Console
from vllm_dp_supervisor.procs import linux
from vllm_dp_supervisor.procs.guard import TreeGuard
from vllm_dp_supervisor.router_workers import RouterWorkers
from vllm_dp_supervisor.server.client import Prober
from vllm_dp_supervisor.settings.config import Config, RankLogs
from vllm_dp_supervisor.settings.plan import RUN_ENV, RankSpec, run_tag

log = logging.getLogger("supervisor")


class Supervisor:
    """The machine, its loops and mechanisms, each handed what it works with at construction."""

    def __init__(self, config: Config, specs: Sequence[RankSpec], prober: Prober, metrics: PodMetrics, *,
                 environ: Mapping[str, str], guard: TreeGuard | None, console: Console | None,
                 log_dir: Path | None, router_sock: socket.socket | None) -> None:
        new_process = functools.partial(make_process, config, environ=environ, console=console, log_dir=log_dir)
        self.config = config
        self.log_dir = log_dir
        self.tasks = Tasks()
        self.machine = machine = Machine(config, [RankRecord(spec, new_process(spec, 0)) for spec in specs], metrics)
        metrics.register(StateCollector(machine.snapshots))
        self.router = RouterWorkers(config, machine, router_sock, environ) if router_sock is not None else None
        if self.router is not None:
            metrics.register(self.router.stats)
        self.teardown = Teardown(machine, guard, config.stop_budget,
                                 owned_elsewhere=self.router.pids if self.router is not None else tuple)
        self.signals = Signals(config, machine, lambda: self.status(rank_logs=True), self.teardown.reap_orphans)
        health = Health(config, machine, prober, self.tasks, on_ready=functools.partial(remember_tree, guard=guard))
        self.spawner = Spawner(machine, self.tasks, guard, new_process, on_started=health.watch)
        self.recovery = Recovery(config, machine, prober, self.tasks) if config.fault_tolerance else None
        self.restarter = Restarter(machine, self.tasks, self.teardown, self.spawner, self.router,
                                   config.drain_budget)
        self.rolling_restart = RollingRestart(config, machine, self.tasks)
        self.judge = Judge(config, machine, prober, self.tasks)

    def status(self, *, rank_logs: bool) -> dict[str, Any]:
        """GET /status's body (api/status.py)."""
        return status(self.machine, self.router, rank_logs=rank_logs)

    async def _carry_out_orders(self) -> None:
        """Each of the machine's orders to the mechanism that carries it out (core/orders.py)."""
        while True:
            order = await self.machine.orders.next()
            if isinstance(order, Restart):
                self.restarter.start(order)
            elif isinstance(order, Rollout):
                self.rolling_restart.start()
            elif isinstance(order, JudgeOrder):
                self.judge.start(order.rank, order.attempt)

    async def run(self) -> ExitResult:
        machine = self.machine
        dispatcher = asyncio.ensure_future(self.signals.dispatch())
        try:
            self.tasks.spawn(self.teardown.watch_guardian())
            self.tasks.spawn(self._carry_out_orders())
            if self.router is not None:  # first: a request that comes early waits for a ready rank
                await self.router.start()
            for record in machine.records:
                await self.spawner.start(record)
            if self.recovery is not None:
                self.tasks.spawn(self.recovery.watch())
            await machine.stop_requested.wait()
            # /ready answers 503 from here. The router serves on, drains, and only then do the
            # ranks get their signal: nothing in flight is cut by a planned stop.
            if self.router is not None:
                await self.router.drain(self.config.router_settle, self.teardown.stop_timeout, machine.kill_now)
            await self.teardown.stop_all(machine.records, self.spawner.lock)
            await self.tasks.cancel_all()
        finally:
            if self.router is not None:
                await self.router.stop()
            dispatcher.cancel()
        result = machine.stopped()
        result.log_summary(self.log_dir)
        return result


async def serve(config: Config, specs: Sequence[RankSpec], api_sock: socket.socket,
                router_sock: socket.socket | None, run_dir: Path, log_dir: Path | None, admin_token: str | None,
                handled_signals: Sequence[int]) -> ExitResult:
    """Run the pod; how it ended. Nothing here runs before the command line was checked."""
    from vllm_dp_supervisor.api.bounds import connection_budget, quiet_accept_errors, raise_fd_limit
    from vllm_dp_supervisor.api.server import ApiServer, build_app

    loop = asyncio.get_running_loop()
    if sys.version_info < (3, 12):
        # 3.11's default watcher waits in a thread per child; a pidfd on the loop sees an exit
        # within a millisecond (3.12+ does this by default).
        watcher = asyncio.PidfdChildWatcher()
        watcher.attach_loop(loop)
        asyncio.set_child_watcher(watcher)
    # Start: 1. adopt what our ranks' engines leave behind; 2. the guardian, which kills every
    # tree if we are SIGKILLed (and what an earlier run of this directory left); 3. the machine
    # and its loops; 4. signals; 5. the API; 6. the router; 7. the ranks.
    linux.set_child_subreaper()
    guard = TreeGuard()
    guard.start()
    guard.cleanup_dir(str(run_dir))
    guard.kill_tagged(RUN_ENV, run_tag(str(run_dir)))
    console = Console()
    api: ApiServer | None = None
    api_task: asyncio.Future | None = None
    supervisor: Supervisor | None = None
    try:
        async with Prober(config.server.api_key) as prober:
            metrics = PodMetrics(len(specs), config.mode.value, config.startup_timeout)
            supervisor = Supervisor(config, specs, prober, metrics, environ=os.environ, guard=guard, console=console,
                                    log_dir=log_dir, router_sock=router_sock)
            for sig in handled_signals:
                loop.add_signal_handler(sig, supervisor.signals.post, sig)
            quiet_accept_errors()
            rank_metrics = RankMetrics(prober, supervisor.machine.snapshots, [spec.url for spec in specs],
                                       config.probe_timeout, metrics.rank_metrics_skipped)

            async def scrape() -> bytes:
                ranks = await rank_metrics.collect()
                return metrics.render() + ranks  # rendered after the ranks were asked: their skips count in it

            app = build_app(supervisor.machine, lambda rank_logs: supervisor.status(rank_logs=rank_logs), scrape,
                            admin_token, config.show_rank_logs is RankLogs.ALL)
            api = ApiServer(app, api_sock, supervisor.machine.snapshots,
                            connection_budget(raise_fd_limit(), len(specs)))
            api_task = asyncio.ensure_future(api.serve_socket())
            return await supervisor.run()
    finally:
        # Stop (every rank's tree is gone by now): the API, the guardian, the last orphans, the
        # consoles. The run directory goes in cli.main, which made it.
        if api is not None and api_task is not None:
            api.should_exit = True
            await asyncio.gather(api_task, return_exceptions=True)
        guard.close()
        if supervisor is not None:
            supervisor.teardown.reap_orphans()
        console.close()
