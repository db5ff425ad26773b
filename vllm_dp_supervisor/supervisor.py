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

from vllm_dp_supervisor.api.rank_metrics import RankMetrics
from vllm_dp_supervisor.core.machine import Machine
from vllm_dp_supervisor.core.records import RankRecord
from vllm_dp_supervisor.core.result import ExitResult
from vllm_dp_supervisor.loops.health import Health
from vllm_dp_supervisor.loops.judge import Judge
from vllm_dp_supervisor.loops.recovery import Recovery
from vllm_dp_supervisor.loops.restart import Restarter
from vllm_dp_supervisor.loops.rollout import Rollout
from vllm_dp_supervisor.loops.signals import Signals
from vllm_dp_supervisor.loops.spawn import Spawner, make_process, remember_tree
from vllm_dp_supervisor.loops.tasks import Tasks
from vllm_dp_supervisor.loops.teardown import Teardown
from vllm_dp_supervisor.output.console import Console
from vllm_dp_supervisor.procs import linux
from vllm_dp_supervisor.procs.process import TreeGuard
from vllm_dp_supervisor.router.workers import RouterWorkers
from vllm_dp_supervisor.server.client import Prober
from vllm_dp_supervisor.settings.config import Config, RankLogs, effective_stop_timeout
from vllm_dp_supervisor.settings.plan import RUN_ENV, RankSpec, probe_host, run_tag, url_host

log = logging.getLogger("supervisor")


class Supervisor:
    def __init__(self, config: Config, specs: Sequence[RankSpec], prober: Prober, *,
                 environ: Mapping[str, str], guard: TreeGuard | None = None, console: Console | None = None,
                 log_dir: Path | None = None, router_sock: socket.socket | None = None) -> None:
        new_process = functools.partial(make_process, config, environ=environ, console=console, log_dir=log_dir)
        self.config = config
        self.log_dir = log_dir
        self.tasks = Tasks()
        self.machine = machine = Machine(config, [RankRecord(spec, new_process(spec, 0)) for spec in specs])
        self.teardown = Teardown(machine, guard, effective_stop_timeout(config))
        self.signals = Signals(machine, self.teardown.reap_orphans)
        health = Health(machine, prober, self.tasks, on_ready=functools.partial(remember_tree, guard=guard))
        self.spawner = Spawner(machine, self.tasks, guard, new_process, on_started=health.watch)
        self.recovery = Recovery(machine, prober, self.tasks) if config.fault_tolerance else None
        self.router: RouterWorkers | None = None
        if router_sock is not None:
            self.router = RouterWorkers(config, machine, router_sock, environ)
            machine.router = self.router
            machine.metrics.registry.register(self.router.stats)
            self.teardown.owned_elsewhere = self.router.pids
        machine.start_restart = Restarter(machine, self.tasks, self.teardown, self.spawner,
                                          self.router.quiesce if self.router is not None else None).start
        machine.start_rollout = Rollout(machine, self.tasks, self.teardown.stop_timeout).start
        machine.start_judging = Judge(machine, prober, self.tasks).start

    async def run(self) -> ExitResult:
        machine = self.machine
        dispatcher = asyncio.ensure_future(self.signals.dispatch())
        try:
            self.tasks.spawn(self.teardown.watch_guardian())
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
            supervisor = Supervisor(config, specs, prober, environ=os.environ, guard=guard, console=console,
                                    log_dir=log_dir, router_sock=router_sock)
            for sig in handled_signals:
                loop.add_signal_handler(sig, supervisor.signals.post, sig)
            quiet_accept_errors()
            machine = supervisor.machine
            skipped = machine.metrics.rank_metrics_skipped
            rank_metrics = RankMetrics(prober, lambda: machine.snapshots.current, url_host(probe_host(config.host)),
                                       config.probe_timeout, lambda rank, why: skipped.labels(str(rank), why).inc())
            app = build_app(machine, admin_token, config.show_rank_logs is RankLogs.ALL, rank_metrics.collect)
            api = ApiServer(app, api_sock, connection_budget(raise_fd_limit(), len(specs)))
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
