"""loops/judge.py in-process: a stalled rank is judged by its token counters, read from a scripted
prober; the machine (fakes.Pod) gives the verdict."""

from __future__ import annotations

import asyncio

import pytest
from fakes import Pod

from vllm_dp_supervisor.core.observations import Stalled
from vllm_dp_supervisor.core.orders import Judge as JudgeOrder
from vllm_dp_supervisor.core.states import RankState
from vllm_dp_supervisor.loops import judge as judge_module
from vllm_dp_supervisor.loops.judge import Judge
from vllm_dp_supervisor.loops.tasks import Tasks


class Counters:
    """token_count answers from a list, the last one forever."""

    def __init__(self, *counts: float | None) -> None:
        self.counts = list(counts)
        self.urls: list[str] = []

    async def token_count(self, base_url: str, timeout: float) -> float | None:
        self.urls.append(base_url)
        return self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]


@pytest.mark.parametrize(("counts", "state"), [
    ((10.0, 10.0, 12.0), RankState.READY),  # they moved: a long prefill, back in rotation
    ((10.0,), RankState.UNHEALTHY),  # they did not: hung
    ((None,), RankState.READY),  # nothing to judge by: left to the deep probe
])
def test_a_stalled_rank_is_judged_by_its_token_counters(monkeypatch, counts, state):
    monkeypatch.setattr(judge_module, "JUDGE_S", 0.05)
    monkeypatch.setattr(judge_module, "JUDGE_POLL_S", 0.002)
    pod = Pod("--restart-policy", "on-failure")
    pod.ready()
    pod.report(Stalled, 1, 3.5, 2)
    order = next(o for o in pod.machine.orders.taken() if isinstance(o, JudgeOrder))
    prober, tasks = Counters(*counts), Tasks()

    async def scenario() -> None:
        Judge(pod.machine.config, pod.machine, prober, tasks).start(order.rank, order.attempt)  # type: ignore[arg-type]
        async with asyncio.timeout(10):
            while len(tasks):
                await asyncio.sleep(0.001)

    asyncio.run(scenario())
    assert pod.record(1).state is state
    assert set(prober.urls) == {pod.record(1).spec.url}
