"""core/machine.py: the state machine's decisions, without processes. A fake clock, fake processes
(they only carry a pid and an output), the real Prometheus counters, and observations made by
hand; its orders are read from its queue, not carried out, except where a test plays the restart
sequence's part through the machine's verbs. tests/e2e/ is the end-to-end net."""

from __future__ import annotations

import signal

import pytest
from fakes import FT, OK, REFUSED, TIMEOUT, UNAUTHORIZED, Pod
from harness import NEVER, ROOT
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_dp_supervisor.core.observations import (
    Busy,
    DeepProbed,
    Exited,
    Faulted,
    Idle,
    Judged,
    Probed,
    RecoveryEnded,
    Squatted,
    Stalled,
)
from vllm_dp_supervisor.core.records import RefusedAction
from vllm_dp_supervisor.core.states import RankState, SupervisorState
from vllm_dp_supervisor.server.probes import ProbeFailure, ProbeResult


def test_a_crash_with_policy_never_stops_the_pod_with_the_ranks_exit_code():
    pod = Pod(*NEVER)
    pod.ready()
    assert pod.machine.snapshots.current.ready
    pod.report(Exited, 1, -signal.SIGKILL, True)  # and the cgroup's OOM kill count rose
    m = pod.machine
    assert pod.record(1).state is RankState.EXITED
    assert m.state is SupervisorState.STOPPING and m.stop_requested.is_set()
    assert not m.snapshots.current.ready and not m.snapshots.current.live
    assert pod.restarts == []
    result = m.stopped()
    assert result.code == 137
    assert result.first_failure is not None and result.first_failure.rank == 1
    oom = "killed by SIGKILL by the kernel's OOM killer (out of memory)"
    assert result.first_failure.reason == f"rank 1 {oom}"
    assert result.failure_error == "RuntimeError: CUDA out of memory"  # its last words
    assert [row.outcome for row in result.rows] == ["ready", oom]


def test_a_sigkill_with_no_oom_kill_and_no_error_line_guesses_nothing():
    """Seen with real vLLM: an API server SIGKILLed from outside read 'out of memory?' and its
    start-up warning as its error."""
    pod = Pod(*NEVER)
    pod.ready()
    pod.record(0).current.process.output.error = None
    pod.report(Exited, 0, -signal.SIGKILL, False)
    result = pod.machine.stopped()
    assert result.sentence() == "exiting with code 137: rank 0 killed by SIGKILL (no error in its output)"


def test_a_server_that_exits_0_by_itself_has_failed():
    pod = Pod(*NEVER)
    pod.ready()
    pod.report(Exited, 0, 0)
    assert "by itself" in (pod.record(0).current.outcome or "")
    assert pod.machine.stopped().code == 5


def test_a_crash_under_on_failure_asks_for_a_restart_of_that_rank_only():
    pod = Pod("--restart-policy", "on-failure", "--restart-backoff", "2")
    pod.ready()
    pod.report(Exited, 0, 3)
    assert pod.machine.state is SupervisorState.RUNNING
    assert pod.restarts == [([0], 2.0, "rank 0 exited with code 3")]
    assert pod.record(0).group.restarting and not pod.record(1).group.restarting
    assert pod.machine.snapshots.current.ranks[0].restarts == 1
    assert pod.events("restart")[0]["attempt"] == 1


def test_a_stale_report_is_dropped_in_one_place():
    pod = Pod("--restart-policy", "on-failure")
    pod.ready()
    old = pod.record(0).attempt
    pod.report(Exited, 0, 1)
    pod.restart(pod.record(0).group)
    assert pod.record(0).attempt == old + 1 and pod.record(0).state is RankState.STARTING
    version = pod.machine.snapshots.current.version
    for late in (Exited(0, old, 1), Probed(0, old, OK, 1.0), DeepProbed(0, old, TIMEOUT),
                 Faulted(0, old, ({"id": 0, "status": "faulted"},))):
        assert pod.machine.report(late) is False
    assert pod.record(0).state is RankState.STARTING
    assert pod.machine.snapshots.current.version == version  # nothing published


def test_probe_failures_below_the_threshold_keep_the_rank_ready():
    pod = Pod(*NEVER, "--failure-threshold", "3")
    pod.ready()
    assert pod.report(Probed, 0, TIMEOUT, 30.0)
    assert pod.report(Probed, 0, TIMEOUT, 31.0)
    assert pod.record(0).state is RankState.READY and pod.record(0).current.consecutive_failures == 2
    assert pod.report(Probed, 0, OK, 32.0)  # one success starts the count over
    assert pod.report(Probed, 0, TIMEOUT, 33.0) and pod.report(Probed, 0, TIMEOUT, 34.0)
    assert not pod.report(Probed, 0, TIMEOUT, 35.0)  # the third in a row: the loop may end
    assert pod.record(0).state is RankState.UNHEALTHY
    assert pod.machine.state is SupervisorState.STOPPING
    assert pod.machine.failures[0].reason == \
        "rank 0 unhealthy: 3 probes failed in a row (last: no answer in 5 s)"
    assert pod.events("probe_failures")[0]["consecutive"] == 3


def test_a_503_from_health_is_an_engine_that_died_and_is_not_counted_out():
    dead = ProbeResult(ProbeFailure.STATUS, 503, 1.0, "HTTP 503")
    pod = Pod(*NEVER, "--failure-threshold", "3")
    pod.ready()
    assert not pod.report(Probed, 0, dead, 30.0)
    assert pod.record(0).state is RankState.UNHEALTHY
    assert pod.machine.failures[0].reason == "rank 0 unhealthy: its engine died (/health answered 503)"
    other = Pod("--failure-threshold", "3")
    other.ready()
    assert other.report(Probed, 0, ProbeResult(ProbeFailure.STATUS, 500, 1.0, "HTTP 500"), 30.0)  # counted
    with_ft = Pod("--failure-threshold", "3", server=FT)
    with_ft.ready()
    assert with_ft.report(Probed, 0, dead, 30.0)  # vLLM's own recovery may bring it back: counted
    assert with_ft.record(0).state is RankState.READY


def test_refused_probes_while_loading_count_only_once_the_startup_timeout_passed():
    pod = Pod(*NEVER, "--startup-timeout", "60")
    for since in (1.0, 30.0, 59.9):
        assert pod.report(Probed, 0, REFUSED, since)
    assert pod.record(0).state is RankState.STARTING
    assert pod.metrics.startup_probe_failures.labels("0", "refused")._value.get() == 3
    assert not pod.report(Probed, 0, REFUSED, 60.0)
    assert pod.record(0).state is RankState.UNHEALTHY
    assert pod.machine.failures[0].reason == \
        "rank 0 not ready after --startup-timeout 60 s (last probe: connection refused)"


def test_the_restart_budget_runs_out_and_then_the_pod_stops():
    pod = Pod("--restart-policy", "always", "--max-restarts", "2", "--restart-window", "100", ranks=1)
    for n in range(2):
        pod.ready()
        pod.clock.now += 1
        pod.report(Exited, 0, 1)
        assert len(pod.restarts) == n + 1
        pod.restart(pod.record(0).group)
    pod.ready()
    pod.report(Exited, 0, 1)
    assert len(pod.restarts) == 2
    assert pod.machine.failures[0].reason == "rank 0 exited with code 1; restart limit reached (2 within 100 s)"
    pod.clock.now += 200  # the window has passed, but the pod is stopping: no more restarts
    assert pod.machine.state is SupervisorState.STOPPING


def test_dp_mode_restarts_the_whole_group_on_one_shared_budget():
    pod = Pod("--mode", "dp", "--restart-policy", "on-failure", "--max-restarts", "1", ranks=3)
    pod.ready()
    pod.report(Exited, 2, 1)
    assert pod.restarts[0][0] == [0, 1, 2]
    group = pod.record(0).group
    assert group is pod.record(2).group and group.restarting
    pod.report(Exited, 1, 1)
    assert pod.machine.state is SupervisorState.RUNNING
    assert len(pod.restarts) == 1  # the restart under way covers the others' deaths
    pod.restart(group)
    assert [r.attempt for r in pod.machine.records] == [1, 1, 1]
    assert {r.restarts for r in pod.machine.snapshots.current.ranks} == {1}
    pod.ready()
    pod.report(Exited, 0, 1)  # the shared budget (1) is spent: the pod stops
    assert pod.machine.state is SupervisorState.STOPPING


def test_an_operator_restart_is_refused_while_the_group_restarts():
    pod = Pod("--mode", "dp", "--restart-policy", "on-failure", ranks=2)
    pod.ready()
    assert pod.machine.restart_rank(1) == {"rank": 1, "restarting": True}
    assert pod.restarts[0][:2] == ([0, 1], 0.0)
    with pytest.raises(RefusedAction, match="already restarting"):
        pod.machine.restart_rank(0)


def test_recovery_takes_the_group_out_and_brings_it_back():
    pod = Pod("--mode", "dp", ranks=2, server=FT)
    pod.ready()
    assert pod.report(Faulted, 1, ({"id": 1, "status": "faulted", "fault_info": "nccl"},))
    assert [r.state for r in pod.machine.records] == [RankState.RECOVERING] * 2
    view = pod.machine.snapshots.current
    assert not view.ready and view.ready_ranks == 0
    assert pod.report(Probed, 0, TIMEOUT, 40.0)  # a halted engine: its probe failures do not count
    assert pod.record(0).current.consecutive_failures == 0
    assert pod.report(DeepProbed, 0, TIMEOUT)  # nor its deep probes, and the loop goes on
    assert not pod.report(Faulted, 1, ())  # already recovering: no second recovery
    pod.report(RecoveryEnded, 1, None)
    assert [r.state for r in pod.machine.records] == [RankState.READY] * 2
    assert pod.machine.snapshots.current.ready
    assert [e.kind for e in pod.machine.events.since(0) if e.kind in ("fault", "recovered")] == \
        ["fault", "recovered"]


def test_a_failed_recovery_falls_back_to_the_restart_policy():
    pod = Pod("--mode", "dp", "--restart-policy", "on-failure", ranks=2, server=FT)
    pod.ready()
    pod.report(Faulted, 0, ({"id": 0, "status": "dead"},))
    pod.report(RecoveryEnded, 0, "an engine is dead, not recoverable")
    assert pod.record(0).state is RankState.UNHEALTHY
    assert pod.record(1).state is RankState.RECOVERING  # unready until the restart
    assert pod.restarts[0][0] == [0, 1]


def test_drain_takes_the_pod_out_while_the_ranks_keep_serving():
    pod = Pod()
    pod.ready()
    assert pod.machine.drain() == {"draining": True, "changed": True}
    view = pod.machine.snapshots.current
    assert not view.ready and view.ready_ranks == 2 and not view.rank_ready(0)
    assert pod.machine.drain()["changed"] is False
    assert pod.machine.undrain() == {"draining": False, "changed": True}
    assert pod.machine.snapshots.current.ready
    pod.machine.operator_stop()
    with pytest.raises(RefusedAction, match="stopping"):
        pod.machine.drain()


def test_a_squatted_port_stops_the_pod_whatever_the_restart_policy():
    pod = Pod("--restart-policy", "always")
    assert not pod.report(Squatted, 0, (4242,), "pid 4242 (nc)")
    assert pod.record(0).state is RankState.UNHEALTHY
    assert pod.restarts == [] and pod.machine.state is SupervisorState.STOPPING
    assert "port" in pod.machine.failures[0].reason and "pid 4242 (nc)" in pod.machine.failures[0].reason


def test_deep_probes_hung_unauthorized_and_recovered():
    pod = Pod(*NEVER, "--failure-threshold", "2")
    pod.ready()
    assert pod.report(DeepProbed, 0, TIMEOUT) and pod.record(0).current.deep_failures == 1
    assert pod.report(DeepProbed, 0, OK) and pod.record(0).current.deep_failures == 0
    assert not pod.report(DeepProbed, 1, UNAUTHORIZED)  # misconfigured, not hung: not counted
    assert pod.record(1).state is RankState.READY and pod.record(1).current.deep_failures == 0
    assert pod.report(DeepProbed, 0, TIMEOUT)
    assert not pod.report(DeepProbed, 0, TIMEOUT)
    assert pod.record(0).state is RankState.UNHEALTHY
    assert pod.machine.failures[0].reason.startswith("rank 0 hung: 2 one-token completions failed")


def test_a_failed_spawn_is_a_state_change_and_exit_127():
    pod = Pod()
    pod.machine.spawn_failed(pod.record(0), OSError(8, "Exec format error"))
    assert pod.record(0).state is RankState.EXITED
    assert pod.machine.stopped().code == 127


ACTIONS = st.lists(st.tuples(st.sampled_from(["ok", "fail", "exit", "deep_fail", "fault", "recovered",
                                              "recovery_failed", "restart_done", "drain", "undrain",
                                              "operator_restart", "rollout", "stalled", "idle", "busy",
                                              "working", "hung", "clock"]),
                             st.integers(0, 2)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(actions=ACTIONS, dp=st.booleans())
def test_any_sequence_of_observations_keeps_the_view_equal_to_the_records(actions, dp):
    """Whatever the loops report, in any order: no illegal transition, every change published,
    and the published view is the records' state."""
    options = ["--restart-policy", "always", "--max-restarts", "5", "--failure-threshold", "2",
               *(["--mode", "dp"] if dp else [])]
    pod = Pod(*options, ranks=3, server=FT)
    m = pod.machine
    for action, rank in actions:
        record = pod.record(rank)
        version = m.snapshots.current.version
        state_events = len(pod.events("state"))
        before = [r.state for r in m.records]
        if action == "ok":
            pod.report(Probed, rank, OK, 1.0)
        elif action == "fail":
            pod.report(Probed, rank, TIMEOUT, 1.0)
        elif action == "exit" and (rank, record.attempt) not in pod.exited:
            pod.report(Exited, rank, 1)
        elif action == "deep_fail":
            pod.report(DeepProbed, rank, TIMEOUT)
        elif action == "fault":
            pod.report(Faulted, rank, ({"id": 0, "status": "faulted"},))
        elif action in ("recovered", "recovery_failed") and record.state is RankState.RECOVERING:
            pod.report(RecoveryEnded, rank, None if action == "recovered" else "no")
        elif action == "restart_done" and record.group.restarting and m.state is SupervisorState.RUNNING:
            pod.restart(record.group)
        elif action in ("drain", "undrain", "operator_restart") and m.state is SupervisorState.RUNNING:
            try:
                m.restart_rank(rank) if action == "operator_restart" else getattr(m, action)()
            except RefusedAction:
                pass
        elif action == "stalled":
            pod.report(Stalled, rank, 3.5, 2)
        elif action in ("idle", "busy"):
            pod.report(Idle if action == "idle" else Busy, rank, "test")
        elif action in ("working", "hung"):
            pod.report(Judged, rank, action == "working", "test")
        elif action == "rollout" and m.state is SupervisorState.RUNNING:
            if m.rollout is not None and m.rollout.running:
                m.rollout_ended("test")
            else:
                m.begin_rollout()
        elif action == "clock":
            pod.clock.now += 50
        after = [r.state for r in m.records]
        view = m.snapshots.current
        assert [r.state for r in view.ranks] == after
        assert [r.attempt for r in view.ranks] == [r.attempt for r in m.records]
        changed = sum(a is not b for a, b in zip(before, after, strict=True))
        if changed:
            assert view.version > version
            assert len(pod.events("state")) >= state_events + changed
        quorum = m.config.ready_quorum
        if m.rollout is not None and m.rollout.running:  # all but the group restarting, at least one
            quorum = 1 if dp else 2
        assert view.min_ready_ranks == quorum
        assert view.ready == (m.state is SupervisorState.RUNNING and not m.draining
                              and sum(s in (RankState.READY,) for s in after) >= quorum)


def test_a_planned_or_alive_failure_drains_first_and_a_crash_does_not():
    pod = Pod("--restart-policy", "on-failure", "--failure-threshold", "1")
    pod.ready()
    pod.machine.restart_rank(0)  # an operator's restart: the rank finishes what it holds first
    assert pod.drains == [True]
    pod.restart(pod.record(0).group)
    assert [e["new"] for e in pod.events("state") if e["rank"] == 0][-5:] == \
        ["draining", "stopping", "exited", "backoff", "starting"]
    pod.report(DeepProbed, 1, TIMEOUT)  # hung behind a healthy /health: still answers, so drained
    assert pod.drains == [True, True]
    pod.restart(pod.record(1).group)
    pod.ready()
    pod.report(Exited, 0, -signal.SIGKILL)  # crashed: nothing to drain
    assert pod.drains == [True, True, False]


def test_a_rank_that_dies_while_draining_says_so_and_its_restart_goes_on():
    pod = Pod("--restart-policy", "on-failure")
    pod.ready()
    pod.machine.restart_rank(1)
    pod.machine.draining_rank(pod.record(1))
    assert not pod.machine.snapshots.current.ranks[1].serving
    pod.report(Exited, 1, -signal.SIGSEGV)
    assert pod.record(1).current.outcome is not None and "SIGSEGV" in pod.record(1).current.outcome
    assert len(pod.restarts) == 1 and pod.machine.state is SupervisorState.RUNNING


def test_dp_crash_of_one_rank_does_not_drain_its_live_peers():
    pod = Pod("--mode", "dp", "--restart-policy", "on-failure", ranks=2)
    pod.ready()
    pod.report(Exited, 1, -signal.SIGKILL)
    assert pod.drains == [False]


def test_a_rollout_keeps_the_pod_ready_on_the_default_quorum_and_refuses_a_second():
    pod = Pod(ranks=3)
    pod.ready()
    assert pod.machine.snapshots.current.min_ready_ranks == 2  # the default: half, rounded up
    assert pod.machine.begin_rollout() == {"rollout": "started", "groups": [[0], [1], [2]]}
    assert pod.rollouts == 1
    assert pod.machine.snapshots.current.min_ready_ranks == 2
    with pytest.raises(RefusedAction, match="under way"):
        pod.machine.begin_rollout()
    pod.machine.rollout_restart(pod.record(0).group)
    assert pod.drains == [True] and pod.status()["rollout"]["current"] == [0]
    pod.restart(pod.record(0).group)
    pod.ready(0)
    pod.machine.rollout_step_done(pod.record(0).group)
    pod.machine.rollout_ended("rank 1 did not come back: exited with code 1")
    status = pod.status()["rollout"]
    assert status["state"] == "failed" and status["done"] == [0] and "rank 1" in status["why"]
    assert pod.machine.snapshots.current.min_ready_ranks == 2
    assert [e["state"] for e in pod.events("rollout")] == ["started", "restarting", "ranks_ready", "failed"]
    assert pod.machine.begin_rollout()["rollout"] == "started"  # a new one, once that one ended


def test_a_rollout_keeps_an_explicit_quorum_and_in_dp_mode_takes_the_whole_group():
    pod = Pod("--min-ready-ranks", "2", ranks=3)
    pod.ready()
    pod.machine.begin_rollout()
    assert pod.machine.snapshots.current.min_ready_ranks == 2
    dp = Pod("--mode", "dp", ranks=2)
    dp.ready()
    assert dp.machine.snapshots.current.min_ready_ranks == 2  # dp mode's default: all, one engine
    assert dp.machine.begin_rollout()["groups"] == [[0, 1]]
    assert dp.machine.snapshots.current.min_ready_ranks == 1  # the pod is unready while its group restarts


def test_a_stalled_rank_is_judged_in_rotation_and_leaves_it_when_its_engine_is_seen_idle():
    pod = Pod()
    pod.ready()
    assert not pod.report(Stalled, 1, 0.6, 4)
    assert pod.record(1).state is RankState.READY and pod.judged == [1]  # silence alone decides nothing
    pod.report(Stalled, 1, 1.6, 4)  # the router says it again a second later: the same stall
    assert pod.judged == [1]
    pod.report(Idle, 1, "its engine did no work for 0.3 s")
    assert pod.record(1).state is RankState.STALLED
    view = pod.machine.snapshots.current
    assert not view.ranks[1].serving and view.ready_ranks == 1 and view.ready  # on half its ranks
    assert pod.report(DeepProbed, 1, OK)  # the deep probe loop carries on while it is judged
    pod.report(Judged, 1, False, "its engine used no CPU, counted no token and answered no one-token "
                                 "completion for 4 s")
    assert pod.record(1).state is RankState.UNHEALTHY and pod.record(1).current.hung  # its stop gets the short grace
    assert "rank 1 hung: requests got nothing back and its engine used no CPU" in \
        (pod.record(1).current.failure_reason or "")
    assert pod.restarts[0][0] == [1] and pod.drains == [True]  # alive: drained (what it holds is stalled)
    assert [e["quiet_s"] for e in pod.events("stalled")] == [0.6]


def test_a_busy_engine_stays_in_rotation_or_comes_back_and_a_spinning_one_is_hung():
    pod = Pod()
    pod.ready()
    pod.report(Stalled, 0, 0.5, 1)
    pod.report(Busy, 0, "its engine works (97% of a core)")
    assert pod.record(0).state is RankState.READY
    pod.report(Idle, 0, "its engine did no work for 0.3 s")
    assert pod.record(0).state is RankState.STALLED
    pod.report(Busy, 0, "its engine works (80% of a core)")  # SIGCONT: back
    assert pod.record(0).state is RankState.READY and pod.machine.snapshots.current.ranks[0].serving
    pod.report(Judged, 0, False, "its engine spun 60 s (CPU used, no token counted, no one-token completion "
                                 "answered)")
    assert pod.record(0).state is RankState.UNHEALTHY and pod.record(0).current.hung  # from ready too
    pod.report(Idle, 1, "late")  # about a rank that is not judged: nothing happens
    assert pod.record(1).state is RankState.READY


def test_a_stalled_rank_that_works_is_back_and_vouched_for_a_while():
    pod = Pod()
    pod.ready()
    pod.report(Stalled, 0, 3.0, 1)
    pod.report(Idle, 0, "its engine did no work for 0.3 s")
    pod.report(Judged, 0, True, "its token counters moved")
    assert pod.record(0).state is RankState.READY and pod.machine.snapshots.current.ready
    pod.report(Stalled, 0, 9.0, 1)  # the same long prefill, still quiet: not judged again yet
    assert pod.record(0).state is RankState.READY and pod.judged == [0]
    pod.clock.now += 31
    pod.report(Stalled, 0, 40.0, 1)
    pod.report(Idle, 0, "its engine did no work for 0.3 s")
    assert pod.record(0).state is RankState.STALLED and pod.judged == [0, 0]
    pod.report(Judged, 0, None, "nothing to judge by")
    assert pod.record(0).state is RankState.READY  # no evidence either way: left to the deep probe
    pod.report(Judged, 1, False, "late")  # about a rank that is not judged: nothing happens
    assert pod.record(1).state is RankState.READY


@pytest.mark.parametrize(("rank_code", "ours"), [(1, 1), (2, 6), (3, 6), (6, 6), (7, 7), (137, 137), (0, 5)])
def test_a_ranks_own_exit_code_never_reads_as_one_of_the_supervisors(rank_code, ours):
    pod = Pod(*NEVER)
    pod.ready()
    pod.report(Exited, 0, rank_code if rank_code < 128 else -(rank_code - 128))
    assert pod.machine.stopped().code == ours


def test_unhealthy_and_not_ready_in_time_have_codes_of_their_own():
    slow = Pod(*NEVER)
    slow.report(Probed, 0, REFUSED, slow.machine.config.startup_timeout + 1)
    assert slow.machine.stopped().code == 4
    hung = Pod(*NEVER)
    hung.ready()
    for _ in range(hung.machine.config.failure_threshold):
        hung.report(Probed, 0, TIMEOUT, 30.0)
    assert hung.machine.stopped().code == 3


@pytest.mark.parametrize("killed", [False, True], ids=["sigterm", "sigkill"])
def test_an_exit_after_the_rank_was_declared_failed_is_named_for_the_failure_not_as_a_planned_stop(killed):
    """Seen with real vLLM: an EngineCore SIGKILLed read "its engine died" in one line, then
    "stopped (exited with code 0)" in /status and reason="stopped" in the metric."""
    pod = Pod("--failure-threshold", "3")
    pod.ready()
    assert not pod.report(Probed, 0, ProbeResult(ProbeFailure.STATUS, 503, 1.0, "HTTP 503"), 30.0)
    record = pod.record(0)
    pod.machine.stopping(record, signal.SIGTERM)  # the restart sequence stops what is left of it
    if killed:
        pod.machine.killing(record)
    pod.report(Exited, 0, -signal.SIGKILL if killed else 0, False)
    then = "killed by SIGKILL from the supervisor" if killed else "stopped (exited with code 0)"
    assert record.current.outcome == f"its engine died, then {then}"
    assert pod.metrics.exits.labels("0", "engine_died")._value.get() == 1
    assert pod.metrics.exits.labels("0", "stopped")._value.get() == 0


def test_a_planned_stop_is_still_a_stop():
    pod = Pod()
    pod.ready()
    record = pod.record(1)
    pod.machine.stopping(record, signal.SIGTERM)
    pod.report(Exited, 1, 0, False)
    assert record.current.outcome == "stopped (exited with code 0)" and record.current.last_error() is None
    assert pod.metrics.exits.labels("1", "stopped")._value.get() == 1


def test_every_declared_failure_is_a_documented_exit_reason():
    from vllm_dp_supervisor.core.verdicts import DECLARED
    row = next(line for line in (ROOT / "docs" / "observability.md").read_text().splitlines()
               if line.startswith("| `supervisor_rank_exits_total`"))
    assert [k for k in DECLARED if f"`{k}`" not in row] == []
