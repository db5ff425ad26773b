"""The state machine: the only code that assigns a rank's or the supervisor's state.

Loops observe (a process exited, a probe came back, a port is squatted, an engine faulted) and
`report` what they saw; the machine drops reports about an older attempt, then gives its verdict.
Mechanisms (teardown, the restart sequence, spawning) change state only through the verbs below.
Every change goes through `change_state` or `_change_supervisor_state`, publishes a new view
(snapshot.py) before anything else can run, and publishes one event.

It never touches a process, a socket or a file: time and chance come in as functions, what it
counts goes to a `Counters` port, and what a mechanism must carry out (a restart, a rollout, a
judgment) goes out as an order (orders.py). So its decisions are tested without processes
(tests/unit/core/test_machine.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from collections.abc import Callable, Sequence

from vllm_dp_supervisor.core.actions import OperatorActions, RolloutProgress
from vllm_dp_supervisor.core.events import EventKind, EventLog
from vllm_dp_supervisor.core.observations import (
    Busy,
    DeepProbed,
    Exited,
    Faulted,
    Idle,
    Judged,
    Observation,
    Probed,
    RecoveryEnded,
    Squatted,
    Stalled,
    Unreachable,
)
from vllm_dp_supervisor.core.orders import Orders, Restart
from vllm_dp_supervisor.core.ports import Counters, Process
from vllm_dp_supervisor.core.records import Attempt, Failure, RankGroup, RankRecord, make_groups
from vllm_dp_supervisor.core.result import ExitResult
from vllm_dp_supervisor.core.snapshot import PodView, RankView, Snapshots
from vllm_dp_supervisor.core.states import (
    ALIVE,
    RankState,
    SupervisorState,
    check_rank_transition,
    check_supervisor_transition,
)
from vllm_dp_supervisor.core.verdicts import Verdicts
from vllm_dp_supervisor.settings import exits
from vllm_dp_supervisor.settings.config import Config, Mode

log = logging.getLogger("supervisor")

QUIET_STATES = (RankState.READY, RankState.DRAINING, RankState.STOPPING, RankState.STARTING, RankState.BACKOFF)


class Machine(Verdicts, OperatorActions):
    def __init__(self, config: Config, records: Sequence[RankRecord], counters: Counters, *,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 jitter: Callable[[], float] = random.random) -> None:
        """`records`: one per rank, in rank order, each at its first attempt. `counters`: what
        the machine counts goes there (api/metrics.py)."""
        if [r.rank for r in records] != list(range(len(records))) or any(r.attempt for r in records):
            raise ValueError("a machine takes one record per rank, in rank order, each at its first attempt")
        self.config = config
        self.records = list(records)
        self.counters = counters
        self.orders = Orders()
        self.groups = make_groups(self.records, config.restart_rules, coupled=config.mode is Mode.DP)
        self.clock, self.wall_clock, self.jitter = clock, wall_clock, jitter
        self.events = EventLog()
        self.state = SupervisorState.RUNNING
        self.draining = False
        self.stop_reason: str | None = None
        self.stop_signal: int = signal.SIGTERM
        self.failures: list[Failure] = []
        self.stop_requested = asyncio.Event()
        self.kill_now = asyncio.Event()  # a second signal, or SIGQUIT: no more grace
        self.rollout: RolloutProgress | None = None
        self.credentials_refused = False
        self.snapshots = Snapshots(self._view())

    # ---- the only writers of state ----

    def change_state(self, record: RankRecord, new: RankState, why: str) -> None:
        """Move the rank's current attempt along an edge (states.py)."""
        attempt = record.current
        check_rank_transition(attempt.state, new)
        old, attempt.state = attempt.state, new
        attempt.ready_since = self.clock() if new is RankState.READY else None
        self._announce(record, old, new, why)

    def _announce(self, record: RankRecord, old: RankState, new: RankState, why: str) -> None:
        level = logging.INFO if new in QUIET_STATES else logging.WARNING
        if new is RankState.EXITED and (self.state is not SupervisorState.RUNNING or old is RankState.STOPPING):
            level = logging.INFO
        # Reasons that already name the rank ("rank 0 unhealthy: 3 probes failed ...") are said once.
        said = why.removeprefix(f"rank {record.rank} {new.value}: ").removeprefix(f"rank {record.rank}: ")
        self._publish()  # before anyone else runs: /ready answers 503 from here
        record.log.log(level, "rank %d %s: %s", record.rank, new.value, said)
        self.events.publish(EventKind.STATE, record.rank, old=old.value, new=new.value, why=why)

    def _change_supervisor_state(self, new: SupervisorState, why: str) -> None:
        check_supervisor_transition(self.state, new)
        self.state = new
        self._publish()
        log.info("supervisor %s: %s", new.value, why)
        self.events.publish(EventKind.SUPERVISOR, None, new=new.value, why=why)

    def _view(self) -> PodView:
        return PodView(0, self.state, self.draining, self._quorum(), tuple(
            RankView(r.rank, r.spec.port, r.current.process.pid, r.state, r.attempt, r.group.budget.total,
                     r.current.ready_after_s, r.current.process.started_monotonic) for r in self.records))

    def _quorum(self) -> int:
        """--min-ready-ranks; while a rollout runs, its default is at most all but the group
        being restarted (at least one): a planned restart must not take the pod out of its Service."""
        if self.rollout is None or not self.rollout.running or self.config.min_ready_ranks is not None:
            return self.config.ready_quorum
        return min(self.config.ready_quorum, max(1, len(self.records) - max(len(g.records) for g in self.groups)))

    def _publish(self) -> None:
        """Every write of what the view shows ends here: readers never see a half-made change."""
        self.snapshots.publish(self._view())

    # ---- observations: stale ones dropped here, the rest to their verdict ----

    def report(self, seen: Observation) -> bool:
        """Take what a loop saw. True while the loop that saw it should carry on."""
        record = self.records[seen.rank]
        if seen.attempt != record.attempt:
            log.debug("dropped %s: rank %d is at attempt %d", seen, seen.rank, record.attempt)
            return False
        if isinstance(seen, Exited):
            self._on_exit(record, seen.returncode, seen.oom_killed)
            return False
        if isinstance(seen, Probed):
            return self._on_probe(record, seen.result, seen.since_start)
        if isinstance(seen, DeepProbed):
            return self._on_deep_probe(record, seen.result)
        if isinstance(seen, Squatted):
            self._on_squatter(record, seen.description)
            return False
        if isinstance(seen, Faulted):
            return self._begin_recovery(record, seen.engines)
        if isinstance(seen, RecoveryEnded):
            self._end_recovery(record, seen.why_not)
            return False
        if isinstance(seen, Unreachable):
            self._on_unreachable(record, seen.why)
            return False
        if isinstance(seen, Stalled):
            self._on_stalled(record, seen.quiet_s, seen.requests)
            return False
        if isinstance(seen, Judged):
            self._on_judged(record, seen.progressed, seen.detail)
            return False
        if isinstance(seen, Idle | Busy):
            self._on_engine_seen(record, isinstance(seen, Busy), seen.detail)
            return False
        raise TypeError(f"not an observation: {seen!r}")

    def current(self, rank: int, attempt: int) -> bool:
        """Is `attempt` still the rank's current one? (for a loop deciding whether to go on)"""
        return self.records[rank].attempt == attempt

    # ---- what the mechanisms do to a rank ----

    def spawned(self, record: RankRecord) -> None:
        self._publish()  # its pid

    def spawn_failed(self, record: RankRecord, error: OSError) -> None:
        attempt = record.current
        attempt.outcome = f"could not start: {error.strerror or error}"
        attempt.exit_code = exits.CANNOT_START
        self.change_state(record, RankState.EXITED, attempt.outcome)
        self._fail(record, exits.CANNOT_START, f"rank {record.rank} {attempt.outcome}")

    def draining_rank(self, record: RankRecord) -> None:
        """A planned stop of a serving rank: out of the router's rotation first."""
        if record.state is RankState.READY:
            self.change_state(record, RankState.DRAINING, "a planned restart: finishing its requests")

    def stopping(self, record: RankRecord, sig: int) -> None:
        if record.state in ALIVE:
            self.change_state(record, RankState.STOPPING, f"sent {signal.Signals(sig).name}")

    def exit_words(self, attempt: Attempt, last_error: str | None) -> None:
        """What an exited attempt said last, read once its stderr drained: its failure's reason."""
        if attempt.failure_exited and attempt.failure_error is None:
            attempt.failure_error = last_error

    def killing(self, record: RankRecord) -> None:
        record.current.killed_by_supervisor = True  # so its SIGKILL reads as ours, not a crash

    def backoff(self, record: RankRecord, delay: float, why: str) -> None:
        record.current.next_restart_at = round(self.wall_clock() + delay, 3)
        self.change_state(record, RankState.BACKOFF, f"restarting in {delay:.1f} s ({why})")

    def new_attempt(self, record: RankRecord, process: Process) -> None:
        """A new process for a rank in backoff: its attempt is replaced whole."""
        old = record.current.state
        check_rank_transition(old, RankState.STARTING)
        record.current = Attempt(record.attempt + 1, process)
        self._announce(record, old, RankState.STARTING, f"attempt {record.attempt}")

    def restart_done(self, group: RankGroup) -> None:
        group.restarting = False

    def cancel_backoffs(self) -> None:
        for record in self.records:
            if record.state is RankState.BACKOFF:
                self.change_state(record, RankState.EXITED, "not restarted: the supervisor is stopping")

    # ---- stopping ----

    def request_stop(self, reason: str, sig: int = signal.SIGTERM, *, second_kills: bool = False) -> None:
        """Turn unready at once and stop every rank. A second signal kills without waiting."""
        if self.state is not SupervisorState.RUNNING:
            if second_kills:
                self.kill_at_once(f"{reason} while stopping: killing every rank now")
            return
        self.stop_reason = reason
        self.stop_signal = sig
        self.events.publish(EventKind.STOP, None, reason=reason, signal=signal.Signals(sig).name,
                            by="failure" if self.failures else "request")
        self._change_supervisor_state(SupervisorState.STOPPING, reason)
        self.stop_requested.set()

    def kill_at_once(self, why: str) -> None:
        if not self.kill_now.is_set():
            log.warning("%s", why)
            self.kill_now.set()

    def stopped(self) -> ExitResult:
        """Every tree is gone: the run's result."""
        self._change_supervisor_state(SupervisorState.STOPPED, "every rank's process tree is gone")
        self.events.close()
        return ExitResult.of(self.records, self.failures, self.stop_reason)

    # ---- a failed rank: restart its group, or stop the pod ----

    def _fail(self, record: RankRecord, code: int, reason: str) -> None:
        """Stop the pod because of this rank (no restart allowed)."""
        record.current.failure_reason = reason
        if self.state is not SupervisorState.RUNNING:
            return  # the stop under way was decided by an earlier event
        self.failures.append(Failure(self.clock(), record.rank, code, reason))
        self.request_stop(reason, signal.SIGTERM)

    def _rank_failed(self, record: RankRecord, code: int, reason: str, exit_code: int | None) -> None:
        """`code`: the supervisor's exit code if this ends the pod. `exit_code`: the rank's own,
        None when it is alive but failing (hung, unhealthy, not ready in time)."""
        attempt = record.current
        attempt.failure_reason = reason
        attempt.failure_exited = exit_code is not None
        if exit_code is None:
            attempt.failure_error = attempt.process.output.last_error()
        if self.state is not SupervisorState.RUNNING or record.group.restarting:
            return  # a stop or a restart under way already covers this rank
        budget = record.group.budget
        if attempt.ready_since is not None:
            budget.note_ready_for(self.clock() - attempt.ready_since)
        decision = budget.decide(self.clock(), exit_code, self.jitter())
        if not decision.restart:
            if self.config.restart_rules.policy.value != "never":
                reason = f"{reason}; {decision.why}"
            self._fail(record, code, reason)
            return
        self._begin_restart(record, decision.delay_s, reason)

    def _unhealthy(self, record: RankRecord, reason: str, code: int = exits.UNHEALTHY,
                   declared: str = "unhealthy") -> None:
        """Alive but failing: treated like a crash (its tree is stopped if it is restarted).
        `declared`: what it is (verdicts.DECLARED), the label its exit is counted under."""
        record.current.declared = declared
        self.change_state(record, RankState.UNHEALTHY, reason)
        self._rank_failed(record, code, reason, None)

    def _begin_restart(self, record: RankRecord, delay: float, why: str, *, planned: bool = False) -> None:
        """`planned`: asked for (an operator, a rollout), not a failure."""
        group = record.group
        # A group whose servers all still run can finish what it holds before it is stopped (an
        # operator's restart, a hung or failing rank); one with a crashed rank cannot, and its
        # live peers (dp mode) are coupled to the dead one.
        drain = planned or all(r.state is not RankState.EXITED for r in group.records)
        group.restarting = True
        self.counters.restarted(record.rank)
        self._publish()  # its restart count
        self.events.publish(EventKind.RESTART, record.rank, attempt=record.attempt + 1, delay_s=round(delay, 3),
                            reason=why, group=self.config.mode is Mode.DP, drain=drain)
        self.orders.put(Restart(group, delay, why, drain))
