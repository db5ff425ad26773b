"""loops/judge.py in-process: `Watch`, the judgment's pure state, on a fake clock; then the judge
itself on a scripted prober and a scripted engine CPU, with the machine (fakes.Pod) giving the
verdicts."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from fakes import Pod
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_dp_supervisor.core.observations import Stalled
from vllm_dp_supervisor.core.orders import Judge as JudgeOrder
from vllm_dp_supervisor.core.states import RankState
from vllm_dp_supervisor.loops import judge as judge_module
from vllm_dp_supervisor.loops.judge import BUSY_SHARE, HUNG_S, IDLE_S, POLL_S, STOPPED_LOOKS, Judge, Watch
from vllm_dp_supervisor.server.probes import ProbeFailure, ProbeResult
from vllm_dp_supervisor.settings.config import Config

HANG_S = 60.0  # the pure tests' hang timeout (the default is longer: Config.hang_timeout)


def run_watch(cpu_per_s, until: float, produced_at: float | None = None, stopped=lambda t: False,
              looks: list | None = None):
    """Looks every POLL_S from 0 to `until` at an engine using `cpu_per_s(t)` of a core, stopped
    while `stopped(t)`: what each look reported, as (time, kind, progressed); `looks` gets (time,
    share, stopped) of every look."""
    watch = Watch(0.0, 0.0, HANG_S)
    cpu, seen, t = 0.0, [], 0.0
    while t < until:
        t = round(t + POLL_S, 6)
        cpu += cpu_per_s(t) * POLL_S
        if looks is not None:
            looks.append((t, cpu_per_s(t), stopped(t)))
        said = watch.look(t, cpu, stopped(t),
                          "its token counters moved" if produced_at is not None and t >= produced_at else None)
        if said is not None:
            seen.append((t, said.kind, said.progressed))
            if said.kind == "judged":
                break
    return seen


def test_a_stopped_engine_leaves_rotation_then_is_hung():
    seen = run_watch(lambda t: 0.0, 60, stopped=lambda t: True)
    assert [(kind, progressed) for _, kind, progressed in seen] == [("idle", None), ("judged", False)]
    assert seen[0][0] == pytest.approx(IDLE_S) and seen[1][0] == pytest.approx(HUNG_S)


def test_a_stopped_engine_leaves_rotation_on_the_second_look_while_its_workers_still_spin():
    """SIGSTOP of vLLM's EngineCore: its workers busy-poll their queue for ~0.5 s more."""
    seen = run_watch(lambda t: 1.0 if t < 0.55 else 0.0, 60, stopped=lambda t: True)
    assert [(kind, progressed) for _, kind, progressed in seen] == [("busy", None), ("idle", None), ("judged", False)]
    assert seen[1][0] == pytest.approx(STOPPED_LOOKS * POLL_S) and STOPPED_LOOKS == 2
    assert seen[2][0] == pytest.approx(0.5 + HUNG_S)  # the last look that saw work, then HUNG_S


def test_a_busy_engine_stopped_for_one_look_stays_in_rotation():
    """A profiler's dump (py-spy) stops a process for milliseconds."""
    seen = run_watch(lambda t: 1.0, 10, produced_at=5.0, stopped=lambda t: abs(t - 1.0) < 1e-6)
    assert [kind for _, kind, _ in seen] == ["busy", "judged"]


def test_an_idle_engine_that_is_not_stopped_leaves_rotation_and_is_hung_only_after_the_hang_timeout():
    """Waiting on another rank's compile (torch.compile's cache lock) looks like this: out of
    rotation, not killed."""
    seen = run_watch(lambda t: 0.0, 120)
    assert [(kind, progressed) for _, kind, progressed in seen] == [("idle", None), ("judged", False)]
    assert seen[1][0] == pytest.approx(HANG_S)
    assert run_watch(lambda t: 0.0 if t < 10 else 1.0, 120, produced_at=15)[-1][1:] == ("judged", True)


def test_a_busy_engine_stays_in_rotation_until_it_produces():
    seen = run_watch(lambda t: 1.0, 60, produced_at=15.9)  # the CPU build's first logprobs pass
    assert [(kind, progressed) for _, kind, progressed in seen] == [("busy", None), ("judged", True)]


def test_an_engine_that_spins_with_nothing_out_is_hung_after_the_hang_timeout():
    seen = run_watch(lambda t: 1.0, 120)
    assert seen[-1][1:] == ("judged", False) and seen[-1][0] == pytest.approx(HANG_S)


def test_a_stopped_engine_that_resumes_comes_back_and_is_said_once_each_way():
    seen = run_watch(lambda t: 0.0 if 1.0 <= t < 3.0 else 1.0, 10, produced_at=5.0,
                     stopped=lambda t: 1.0 <= t < 3.0)
    assert [kind for _, kind, _ in seen] == ["busy", "idle", "busy", "judged"]


@settings(max_examples=200, deadline=None)
@given(shares=st.lists(st.floats(0, 2), min_size=1, max_size=800),
       stops=st.lists(st.booleans(), min_size=1, max_size=800), produced=st.none() | st.floats(0, 80))
def test_any_engine_is_hung_only_stopped_and_idle_for_hung_s_or_after_the_hang_timeout(shares, stops, produced):
    """Whatever the engine does: never hung once it produced; hung only after HUNG_S stopped and
    idle, or the hang timeout from the stall; every change of busy and idle said once."""
    looks: list[tuple[float, float, bool]] = []
    seen = run_watch(lambda t: shares[round(t / POLL_S) % len(shares)], 90, produced_at=produced,
                     stopped=lambda t: stops[round(t / POLL_S) % len(stops)], looks=looks)
    kinds = [kind for _, kind, _ in seen]
    assert all(a != b for a, b in itertools.pairwise(kinds))  # said once each way
    t, kind, progressed = seen[-1]
    assert kind == "judged"
    if progressed is False:
        assert produced is None or t < produced
        window = [(share, stop) for at, share, stop in looks if at > t - HUNG_S + 1e-6]
        stopped_idle = all(share < BUSY_SHARE and stop for share, stop in window)
        assert stopped_idle or t >= HANG_S - 1e-6
    else:
        assert progressed is True and produced is not None and t >= produced


class Scripted:
    """A prober whose token counts come from a list (the last forever) and whose one-token
    completion answers after `answer_after` s (None: never)."""

    def __init__(self, *counts: float | None, answer_after: float | None = None) -> None:
        self.counts = list(counts)
        self.answer_after = answer_after
        self.urls: list[str] = []

    async def token_count(self, base_url: str, timeout: float) -> float | None:
        self.urls.append(base_url)
        return self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]

    async def model_name(self, base_url: str, timeout: float):
        return "m", ProbeResult(None, 200, 1.0)

    async def probe(self, url: str, timeout: float, json_body: dict | None = None) -> ProbeResult:
        self.urls.append(url)
        if self.answer_after is None:
            await asyncio.sleep(3600)
        await asyncio.sleep(self.answer_after or 0)
        return ProbeResult(None, 200, 1.0) if json_body == {"model": "m", "prompt": "ping", "max_tokens": 1} \
            else ProbeResult(ProbeFailure.STATUS, 400, 1.0, "bad probe")


def judged(monkeypatch, prober: Scripted, cpu_per_poll: float | None, stopped: bool = False) -> list[RankState]:
    """A stall of rank 1 judged to the end (times scaled down 20x): the states it went through."""
    for name in ("POLL_S", "IDLE_S", "HUNG_S", "TOKENS_EVERY_S"):
        monkeypatch.setattr(judge_module, name, getattr(judge_module, name) / 20)
    pod = Pod("--restart-policy", "on-failure", "--hang-timeout", str(HANG_S / 20))
    pod.ready()
    pod.report(Stalled, 1, 0.6, 2)
    order = next(o for o in pod.machine.orders.taken() if isinstance(o, JudgeOrder))
    tasks, cpu, states = judge_module.Tasks(), [0.0], []

    def engine_cpu(record) -> tuple[float | None, bool]:
        states.append(record.state)
        if cpu_per_poll is None:
            return None, stopped
        cpu[0] += cpu_per_poll
        return cpu[0], stopped

    async def scenario() -> None:
        Judge(pod.machine.config, pod.machine, prober, tasks, engine_cpu).start(order.rank, order.attempt)  # type: ignore[arg-type]
        async with asyncio.timeout(30):
            while len(tasks):
                await asyncio.sleep(0.001)

    asyncio.run(scenario())
    states.append(pod.record(1).state)
    assert pod.record(1).spec.url in prober.urls
    return [s for i, s in enumerate(states) if i == 0 or s is not states[i - 1]]


def test_the_judge_takes_a_stopped_engine_out_then_declares_it_hung(monkeypatch):
    states = judged(monkeypatch, Scripted(10.0), cpu_per_poll=0.0, stopped=True)
    assert states == [RankState.READY, RankState.STALLED, RankState.UNHEALTHY]


def test_the_judge_leaves_a_busy_engine_in_rotation_until_its_counters_move(monkeypatch):
    states = judged(monkeypatch, Scripted(10.0, 10.0, 10.0, 12.0), cpu_per_poll=POLL_S / 20)
    assert states == [RankState.READY]


def test_an_idle_engine_that_answers_a_one_token_completion_is_working(monkeypatch):
    """Its requests were cancelled: a healthy engine idles, and answers."""
    states = judged(monkeypatch, Scripted(10.0, answer_after=0.1), cpu_per_poll=0.0)
    assert states == [RankState.READY, RankState.STALLED, RankState.READY]


def test_without_cpu_or_token_counters_the_judge_still_ends_at_the_hang_timeout(monkeypatch):
    states = judged(monkeypatch, Scripted(None), cpu_per_poll=None)
    assert states == [RankState.READY, RankState.STALLED, RankState.UNHEALTHY]


def test_the_manual_states_the_judge_s_numbers():
    from harness import ROOT

    page = " ".join((ROOT / "docs" / "router.md").read_text().split())
    assert f"After {IDLE_S:g} s of that the rank leaves rotation" in page
    assert f"idle for {HUNG_S:g} s, it is declared hung" in page
    assert STOPPED_LOOKS == 2 and "Seen stopped on two looks in a row (0.1 s apart) it leaves rotation" in page
    assert f"**nothing out for `--hang-timeout`** ({Config.hang_timeout:g} s)" in page
    assert f"(`--stall-timeout`, {Config.stall_timeout:g} s)" in page
    assert f"under {BUSY_SHARE:.0%} of a core" in page
