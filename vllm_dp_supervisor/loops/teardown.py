"""Stopping process trees and making sure they are gone: for the whole pod, and for the ranks of
one restart. Also reaps what is re-parented to us, and keeps the guardian running.

Teardown polls (every TEARDOWN_POLL_S): it is never how a death is detected (that is the pidfd in
spawn.py), only how the end of a tree we stopped is confirmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Sequence

from vllm_dp_supervisor.core.events import EventKind
from vllm_dp_supervisor.core.machine import Machine
from vllm_dp_supervisor.core.records import RankRecord
from vllm_dp_supervisor.loops.spawn import process_of
from vllm_dp_supervisor.procs import leftovers, linux
from vllm_dp_supervisor.procs.guard import TreeGuard
from vllm_dp_supervisor.procs.process import RankProcess
from vllm_dp_supervisor.settings import exits

log = logging.getLogger("supervisor")

# After SIGKILL, how long the kernel gets to tear the trees down before we report survivors.
KILL_GRACE_S = 5.0
# After the SIGKILL, how long multiprocessing's resource trackers get to unlink their semaphores
# (they exit within milliseconds of their last user) before they are SIGKILLed too.
TRACKER_GRACE_S = 1.0
TEARDOWN_POLL_S = 0.02
# Once the trees are gone, how long their output pipes get to deliver the last lines.
DRAIN_S = 2.0


def _proc(record: RankRecord) -> RankProcess:
    return process_of(record.current)


class Teardown:
    def __init__(self, machine: Machine, guard: TreeGuard | None, stop_timeout: float,
                 owned_elsewhere: Callable[[], Iterable[int]]) -> None:
        """`owned_elsewhere`: children that asyncio waits for besides the ranks (the router's
        workers): never reaped here, which would steal their exit status, nor stopped as strays."""
        self._machine = machine
        self._guard = guard
        self.stop_timeout = stop_timeout
        self._owned_elsewhere = owned_elsewhere

    async def stop_all(self, records: Sequence[RankRecord], lock: asyncio.Lock) -> None:
        """The pod's stop: every rank's tree, then whatever else was re-parented to us."""
        async with lock:  # no spawn in flight; none can start (the machine is stopping)
            self._machine.cancel_backoffs()
            started = [r for r in records if _proc(r).pid is not None]
        await self.stop_trees(started, self._machine.stop_signal, interruptible=True)
        await self._stop_unowned()
        await asyncio.gather(*(_proc(r).drain_output(DRAIN_S) for r in started))

    async def stop_trees(self, records: Sequence[RankRecord], sig: int, *, interruptible: bool) -> None:
        """Signal each rank's tree, wait --stop-timeout, SIGKILL what survives, wait until gone;
        then remove their shared memory. Trees whose engine was declared hung get SIGKILL at
        once: a graceful stop would answer the requests they hold with errors after a wait, where
        a killed rank's unanswered requests go to another rank (the router's retry rule). So do
        trees whose server is gone (it crashed): what is left (vLLM's engine, orphaned) answers
        no one, yet goes on generating for the streams it held, on the cores and the memory the
        other ranks and the restart need; a SIGTERM took it up to 3 s to act on."""
        hung = all(r.current.hung for r in records)
        headless = all(_proc(r).returncode is not None for r in records)
        at_once = hung or headless
        for record in records:
            self._machine.stopping(record, signal.SIGKILL if at_once else sig)
        for record in records:
            process = _proc(record)
            await asyncio.to_thread(process.remember_descendants)  # /proc scans, off the loop
            if not at_once:
                process.send(sig)
                process.send(signal.SIGCONT)  # a stopped (SIGSTOP) process acts on it once continued
        killed = at_once or not await self._wait_gone(records, self.stop_timeout, interruptible=interruptible)
        if killed:
            await self._kill(records, "its engine is hung: no graceful stop" if hung else
                             "its server is gone: what is left of it answers no one" if headless else
                             self._why_kill())
        for record in records:
            if not _proc(record).tree_alive():
                self._forget(record)
        if killed:
            await self._remove_unused_shared_memory(records)

    async def _remove_unused_shared_memory(self, records: Sequence[RankRecord]) -> None:
        """Killed before its workers shut down: the semaphores and segments only they would have
        unlinked."""
        starts = [t for t in (_proc(r).started_at for r in records) if t is not None]
        if not starts:
            return
        since = min(starts)
        for path in await asyncio.to_thread(leftovers.unused_shared_memory, since):
            with contextlib.suppress(OSError):
                os.unlink(path)
                log.info("ranks %s: removed %s (no process uses it)", [r.rank for r in records], path)

    def _why_kill(self) -> str:
        if self._machine.kill_now.is_set():
            return "second signal"
        return f"still running after --stop-timeout {self.stop_timeout:g} s"

    async def _kill(self, records: Sequence[RankRecord], why: str) -> None:
        """SIGKILL, sparing multiprocessing's resource trackers for TRACKER_GRACE_S (they unlink
        the semaphores only they know of), then everything; say what survives even that."""
        for record in records:
            process = _proc(record)
            if process.tree_alive():
                record.log.warning("rank %d: %s; SIGKILL to pids %s", record.rank, why, process.survivors())
                self._machine.killing(record)
                process.kill_all_but_trackers()
        if not await self._wait_gone(records, TRACKER_GRACE_S, interruptible=False):
            for record in records:
                _proc(record).send(signal.SIGKILL)
        if await self._wait_gone(records, KILL_GRACE_S, interruptible=False):
            return
        for record in records:
            if _proc(record).tree_alive():
                record.log.error("rank %d: pids %s survived SIGKILL for %g s (uninterruptible sleep in the "
                                 "kernel?)", record.rank, _proc(record).survivors(), KILL_GRACE_S)

    def _forget(self, record: RankRecord) -> None:
        """A tree verified gone: its shared memory is removed, and the guardian lets it go."""
        process = _proc(record)
        removed = process.remove_shm()
        if removed:
            record.log.info("rank %d: removed shared memory %s", record.rank, " ".join(removed))
        if self._guard is not None and process.pgid is not None:
            self._guard.release(process.pgid)

    async def _wait_gone(self, records: Iterable[RankRecord], timeout: float, *, interruptible: bool) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self.reap_orphans()
            if all(_proc(r).returncode is not None and not _proc(r).tree_alive() for r in records):
                return True
            if time.monotonic() >= deadline or (interruptible and self._machine.kill_now.is_set()):
                return False
            await asyncio.sleep(TEARDOWN_POLL_S)

    async def _stop_unowned(self) -> None:
        """Whatever was re-parented to us and belongs to no rank (it cleared its environment)
        is stopped too: nothing the run started may outlive it."""
        def unowned() -> list[int]:
            known = {self._guard.pid if self._guard is not None else None, *self._owned_elsewhere()}
            roots = [c for c in linux.children_of(os.getpid()) if c not in known and not linux.is_zombie(c)]
            return [*roots, *(d for r in roots for d in linux.descendants(r))]
        strays = unowned()
        if not strays:
            return
        log.warning("stopping %s: re-parented to the supervisor, of no rank", linux.describe_pids(strays))
        for sig, wait in ((signal.SIGTERM, TRACKER_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
            for pid in strays:
                for s in (sig, signal.SIGCONT):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, s)
            deadline = time.monotonic() + wait
            while (strays := unowned()) and time.monotonic() < deadline:
                await asyncio.sleep(TEARDOWN_POLL_S)
                self.reap_orphans()
            if not strays:
                return
        log.error("pids %s survived SIGKILL", strays)

    def reap_orphans(self) -> None:
        """Reap, by pid, children asyncio does not own: engines orphaned to us as subreaper.
        Never waitpid(-1): it would steal the exit statuses asyncio waits for."""
        owned = {pid for pid in (_proc(r).pid for r in self._machine.records) if pid is not None}
        owned.update(self._owned_elsewhere())
        if self._guard is not None and self._guard.pid is not None:
            owned.add(self._guard.pid)
        for pid, returncode in linux.reap_orphans(owned):
            log.debug("reaped orphan pid %d (%s)", pid, exits.describe_exit(returncode))

    async def watch_guardian(self) -> None:
        """The guardian is what cleans up after a SIGKILLed supervisor: watched like a rank (its
        exit seen on a pidfd at once), and restarted, told everything the last one knew."""
        while self._guard is not None and (pid := self._guard.pid) is not None:
            await linux.exited(pid)
            code = self._guard.reap()
            outcome = exits.describe_exit(code) if code is not None else "exited"
            log.error("the process-tree guardian (pid %d) %s; starting a new one", pid, outcome)
            self._machine.events.publish(EventKind.GUARDIAN, None, pid=pid, outcome=outcome)
            self._guard.start()
            log.info("process-tree guardian running again: pid %d", self._guard.pid)
