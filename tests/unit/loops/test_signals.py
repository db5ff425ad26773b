"""loops/signals.py: what each signal does to the machine (the handler only queues)."""

from __future__ import annotations

from fakes import Pod

from vllm_dp_supervisor.core.states import SupervisorState
from vllm_dp_supervisor.loops.signals import Signals


def signals_of(pod: Pod) -> Signals:
    return Signals(pod.machine.config, pod.machine, status=pod.status, reap_orphans=lambda: None)


def test_a_second_signal_kills_at_once_and_sigquit_at_the_first():
    pod = Pod()
    signals = signals_of(pod)
    signals.handle_term()
    assert pod.machine.state is SupervisorState.STOPPING and not pod.machine.kill_now.is_set()
    assert pod.machine.stop_reason == "SIGTERM received"
    signals.handle_int()
    assert pod.machine.kill_now.is_set()
    assert pod.machine.stop_reason == "SIGTERM received"  # the first reason stays
    quit_pod = Pod()
    signals_of(quit_pod).handle_quit()
    assert quit_pod.machine.kill_now.is_set()
    assert quit_pod.machine.stopped().code == 0  # asked for: not a failure
