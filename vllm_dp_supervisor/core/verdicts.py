"""The state machine's verdicts on what the loops saw: a part of `machine.Machine`, kept in a
file of its own for length. Each verdict reads one observation of one rank's current attempt
(stale ones never get here) and writes only through the machine's writers.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

from vllm_dp_supervisor.core.events import EventKind, EventLog
from vllm_dp_supervisor.core.orders import Judge, Orders
from vllm_dp_supervisor.core.ports import Counters
from vllm_dp_supervisor.core.records import RankRecord
from vllm_dp_supervisor.core.states import PROBED, RankState, SupervisorState
from vllm_dp_supervisor.server.probes import ProbeResult
from vllm_dp_supervisor.settings import exits
from vllm_dp_supervisor.settings.config import Config

log = logging.getLogger("supervisor")

# A stalled rank judged working is not judged again for this long (one long prefill stays quiet
# for a while: it is left in rotation, and the deep probe still watches it).
VOUCH_S = 30.0

# What a rank can be declared while alive, each the label its exit is counted under
# (supervisor_rank_exits_total{reason}) and how its outcome reads: the stop that follows is ours,
# but the exit is the failure's, never a planned "stopped".
DECLARED = {
    "engine_died": "its engine died",
    "hung": "hung",
    "unhealthy": "unhealthy",
    "not_ready": "not ready in time",
    "recovery_failed": "its in-engine recovery failed",
}


class Verdicts:
    """What the machine provides to its verdicts (see machine.py)."""
    config: Config
    records: list[RankRecord]
    state: SupervisorState
    events: EventLog
    counters: Counters
    orders: Orders
    clock: Callable[[], float]
    credentials_refused: bool

    def change_state(self, record: RankRecord, new: RankState, why: str) -> None:
        raise NotImplementedError

    def _fail(self, record: RankRecord, code: int, reason: str) -> None:
        raise NotImplementedError

    def _rank_failed(self, record: RankRecord, code: int, reason: str, exit_code: int | None) -> None:
        raise NotImplementedError

    def _unhealthy(self, record: RankRecord, reason: str, code: int = exits.UNHEALTHY,
                   declared: str = "unhealthy") -> None:
        raise NotImplementedError

    def _on_exit(self, record: RankRecord, returncode: int, oom_killed: bool | None = None) -> None:
        attempt = record.current
        attempt.ended_monotonic = self.clock()
        attempt.exit_code = exits.exit_code(returncode)
        failed_by_itself = False
        if attempt.killed_by_supervisor and returncode == -signal.SIGKILL:
            declared = DECLARED.get(attempt.declared or "")
            attempt.outcome = f"{declared}, then killed by SIGKILL from the supervisor" if declared else \
                "killed by SIGKILL from the supervisor"
            reason = attempt.declared or "killed_by_supervisor"
        elif (attempt.state in PROBED or attempt.state is RankState.DRAINING) and self.state is SupervisorState.RUNNING:
            failed_by_itself = True
            attempt.outcome = exits.describe_exit(returncode, oom_killed)
            reason = "signal" if returncode < 0 else "exit_code"
            if returncode == 0:
                attempt.outcome += " by itself (a server that ends on its own has failed)"
                reason = "exit_zero"
        elif attempt.state is RankState.UNHEALTHY:  # declared failed already; it went first
            attempt.outcome = exits.describe_exit(returncode, oom_killed)
            reason = "signal" if returncode < 0 else "exit_code"
        elif attempt.declared is not None:  # declared failed while alive; our stop ended it
            stopped = exits.describe_exit(returncode, oom_killed)
            attempt.outcome = f"{DECLARED[attempt.declared]}, then stopped ({stopped})"
            reason = attempt.declared
        else:
            attempt.outcome = f"stopped ({exits.describe_exit(returncode, oom_killed)})"
            reason = "stopped"
        self.counters.exited(record.rank, reason)
        self.change_state(record, RankState.EXITED, attempt.outcome)  # /ready answers 503 from here
        if failed_by_itself:
            code = exits.of_rank_exit(attempt.exit_code)
            self._rank_failed(record, code, f"rank {record.rank} {attempt.outcome}", attempt.exit_code)

    def _on_probe(self, record: RankRecord, result: ProbeResult, since_start: float) -> bool:
        attempt, cfg = record.current, self.config
        if attempt.state not in PROBED:
            return False  # the rank moved on while the probe was in flight
        # Refused probes while a model loads are expected (thousands in a long load): counted
        # apart, so an alert on probe failures means a rank that was ready.
        self.counters.probed(record.rank, result.elapsed_ms / 1000,
                             None if result.failure is None else result.failure.value,
                             attempt.state is RankState.STARTING)
        attempt.last_probe_ms = result.elapsed_ms
        attempt.last_probe_error = None if result.ok else result.detail
        if attempt.state is RankState.RECOVERING and not result.ok:
            return True  # the in-engine recovery under way decides this rank's fate
        if result.ok:
            attempt.consecutive_failures = 0
            if attempt.state is RankState.STARTING:
                attempt.ready_after_s = since_start
                self.change_state(record, RankState.READY, f"ready after {since_start:.1f} s")
                if all(r.state is RankState.READY for r in self.records):
                    log.info("all %d ranks ready", len(self.records))
            return True
        if attempt.state is RankState.STARTING:
            if since_start >= cfg.startup_timeout:  # refused while loading is expected until then
                self._unhealthy(record, f"rank {record.rank} not ready after --startup-timeout "
                                f"{cfg.startup_timeout:g} s (last probe: {result.detail})", exits.NOT_READY,
                                declared="not_ready")
                return False
            return True
        attempt.consecutive_failures += 1
        if result.engine_dead and not self.config.fault_tolerance:  # with it, vLLM may bring the engine back
            self._unhealthy(record, f"rank {record.rank} unhealthy: its engine died (/health answered 503)",
                            declared="engine_died")
            return False
        if not self._too_many(record, attempt.consecutive_failures, result.detail, "probe"):
            return True
        self._unhealthy(record, f"rank {record.rank} unhealthy: {attempt.consecutive_failures} probes "
                                f"failed in a row (last: {result.detail})")
        return False

    def _too_many(self, record: RankRecord, failures: int, detail: str, probe: str) -> bool:
        """Say one more failure in a row; True (and an event) once it reaches --failure-threshold."""
        threshold = self.config.failure_threshold
        record.log.warning("rank %d %s failed (%d/%d): %s", record.rank, probe, failures, threshold, detail)
        if failures < threshold:
            return False
        extra = {"probe": "deep"} if probe == "deep probe" else {}
        self.events.publish(EventKind.PROBE_FAILURES, record.rank, consecutive=failures, threshold=threshold,
                            last=detail, **extra)
        return True

    def _on_deep_probe(self, record: RankRecord, result: ProbeResult) -> bool:
        """The verdict on one one-token completion to a ready rank."""
        attempt = record.current
        if attempt.state is not RankState.READY:
            # a halted engine answers nothing; a stalled one is being judged: probing resumes after
            return record.state in (RankState.RECOVERING, RankState.STALLED)
        if result.unauthorized:
            self._refused_credentials(record, result)
            return False
        if result.ok:
            attempt.deep_failures = 0
            return True
        attempt.deep_failures += 1
        self.counters.deep_probe_failed(record.rank, result.failure.value if result.failure is not None else "error")
        if not self._too_many(record, attempt.deep_failures, result.detail, "deep probe"):
            return True
        attempt.hung = True
        self._unhealthy(record, f"rank {record.rank} hung: {attempt.deep_failures} one-token completions "
                                f"failed in a row (last: {result.detail}) while /health answered", declared="hung")
        return False

    def _refused_credentials(self, record: RankRecord, result: ProbeResult) -> None:
        """A rank that refuses our key is misconfigured, not hung: said once, never counted."""
        if self.credentials_refused:
            return
        self.credentials_refused = True
        given = "the key from the server arguments / VLLM_API_KEY" if self.config.server.api_key else "no key"
        record.log.error(
            "rank %d refused the supervisor's deep probe with %s (the supervisor sent %s): the "
            "ranks require an API key the supervisor cannot find (it reads --api-key, --config and "
            "VLLM_API_KEY); hung engines behind a healthy /health will not be caught. Not counted "
            "as a rank failure.", record.rank, result.detail, given)

    def _on_unreachable(self, record: RankRecord, why: str) -> None:
        """The router could not connect: not a failure by itself (a probe may be in flight, the
        rank may be restarting), but its probe runs now instead of at the next interval."""
        if record.state is RankState.READY:
            record.log.debug("rank %d: the router could not connect (%s); probing it now", record.rank, why)
            record.current.probe_soon.set()

    def _on_stalled(self, record: RankRecord, quiet_s: float, requests: int) -> None:
        """The router holds requests on a ready rank that has sent nothing back for
        --stall-timeout: judged by what its engine does (judge.py), in rotation until it is seen
        doing nothing. Not a failure by itself: a long prefill is quiet too."""
        attempt = record.current
        if record.state is not RankState.READY or attempt.judging or self.clock() < attempt.vouched_until:
            return
        attempt.judging = True
        record.log.info("rank %d: %d request(s) in flight, nothing sent back for %.1f s; judged by what its "
                        "engine does", record.rank, requests, quiet_s)
        self.events.publish(EventKind.STALLED, record.rank, quiet_s=round(quiet_s, 3), requests=requests)
        self.orders.put(Judge(record.rank, record.attempt))

    def _on_engine_seen(self, record: RankRecord, busy: bool, detail: str) -> None:
        """While judged: an engine doing nothing leaves rotation at once (its requests go
        elsewhere), one at work comes back."""
        if not record.current.judging:
            return
        if not busy and record.state is RankState.READY:
            self.change_state(record, RankState.STALLED, f"{detail}; out of rotation while judged")
        elif busy and record.state is RankState.STALLED:
            self.change_state(record, RankState.READY, f"{detail}: working, back in rotation")
        elif busy:
            record.log.info("rank %d: %s: left in rotation while judged", record.rank, detail)

    def _on_judged(self, record: RankRecord, progressed: bool | None, detail: str) -> None:
        attempt = record.current
        if not attempt.judging:
            return
        attempt.judging = False
        if record.state not in (RankState.READY, RankState.STALLED):
            return
        if progressed is False:
            attempt.hung = True
            self._unhealthy(record, f"rank {record.rank} hung: requests got nothing back and {detail}", declared="hung")
            return
        attempt.vouched_until = self.clock() + VOUCH_S
        if record.state is RankState.STALLED:
            self.change_state(record, RankState.READY, f"{detail}: working, back in rotation")
        else:
            record.log.info("rank %d: %s: working", record.rank, detail)

    def _on_squatter(self, record: RankRecord, description: str) -> None:
        """vLLM binds its port early but listens late: another program took it meanwhile, and
        answered the probes for it. A restart would meet the same squatter: the pod stops."""
        reason = f"rank {record.rank}: port {record.spec.port} is answered by {description}, not by the rank's server"
        self.change_state(record, RankState.UNHEALTHY, reason)
        self._fail(record, exits.UNHEALTHY, reason)

    def _begin_recovery(self, record: RankRecord, engines: tuple[dict, ...]) -> bool:
        """A faulted engine (--enable-fault-tolerance): its group leaves service while vLLM
        recovers in place. False when the rank is not in a state to recover from."""
        if record.state is not RankState.READY or record.group.restarting:
            return False
        for r in record.group.records:
            if r.state is RankState.READY:
                self.change_state(r, RankState.RECOVERING, f"engine fault in rank {record.rank}'s group")
        info = ", ".join(f"engine {e.get('id')} {e.get('status')}"
                         + (f" ({e['fault_info']})" if e.get("fault_info") else "") for e in engines)
        record.log.warning("rank %d: %s; group %s unready while it recovers", record.rank, info, record.group.ranks)
        self.events.publish(EventKind.FAULT, record.rank, engines=list(engines), group=record.group.ranks)
        return True

    def _end_recovery(self, record: RankRecord, why_not: str | None) -> None:
        ranks = record.group.ranks
        if why_not is None:
            for r in record.group.records:
                if r.state is RankState.RECOVERING:
                    self.change_state(r, RankState.READY, "in-engine recovery done")
            record.log.info("rank %d: in-engine recovery done; group %s ready again", record.rank, ranks)
            self.events.publish(EventKind.RECOVERED, record.rank, group=ranks)
            return
        self.events.publish(EventKind.RECOVERY_FAILED, record.rank, group=ranks, why=why_not)
        # The others stay unready (recovering) until the restart or the stop that follows.
        if record.state is RankState.RECOVERING and self.state is SupervisorState.RUNNING:
            self._unhealthy(record, f"rank {record.rank}: in-engine recovery failed ({why_not})",
                            declared="recovery_failed")
