"""loops/health.py in-process: the real machine over fake processes (fakes.Pod), a prober that
answers from a script, and the fake clock the machine's tests use (the loops' waits are real but
a few milliseconds long)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import pytest
from fakes import OK, REFUSED, Pod

from vllm_dp_supervisor.core.observations import Exited
from vllm_dp_supervisor.core.records import Attempt
from vllm_dp_supervisor.core.states import RankState
from vllm_dp_supervisor.loops.health import Health
from vllm_dp_supervisor.loops.tasks import Tasks
from vllm_dp_supervisor.server.probes import ProbeResult

FAST_PROBES = ("--startup-probe-interval", "0.005", "--probe-interval", "0.005", "--progress-interval", "30",
               "--deep-probe-interval", "0")


class ScriptedProber:
    """Answers every probe with `answer` (changed by the test), and counts what it was asked."""

    def __init__(self, answer: ProbeResult) -> None:
        self.answer = answer
        self.asked: list[str] = []

    async def probe(self, url: str, timeout: float, json_body: dict | None = None) -> ProbeResult:
        self.asked.append(url)
        await asyncio.sleep(0)
        return self.answer

    async def token_count(self, base_url: str, timeout: float) -> float | None:
        return None

    async def model_name(self, base_url: str, timeout: float) -> tuple[str | None, ProbeResult]:
        return "m", OK


async def until(condition: Callable[[], object], what: str) -> None:
    """Yield to the loops until `condition` holds (a deadline, not a sleep, ends a hung test)."""
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.001)


def health_of(pod: Pod, prober: ScriptedProber, ready: list[Attempt]) -> tuple[Health, Tasks]:
    tasks = Tasks()
    return Health(pod.machine.config, pod.machine, prober, tasks, on_ready=ready.append, clock=pod.clock), tasks


async def to_the_first_progress_line(pod: Pod, health: Health, prober: ScriptedProber, caplog) -> None:
    """Rank 0's loop started, probed, and past --progress-interval (30 s) on the fake clock."""
    record = pod.record(0)
    health.watch(record, record.current)
    await until(lambda: prober.asked, "a first probe")
    pod.clock.now += 31
    await until(lambda: any("not ready after" in r.message for r in caplog.records), "a progress line")


def test_a_loading_attempt_says_how_long_it_has_loaded_then_turns_ready(caplog):
    pod = Pod(*FAST_PROBES)
    prober, ready = ScriptedProber(REFUSED), []
    health, tasks = health_of(pod, prober, ready)

    async def scenario() -> None:
        record = pod.record(0)
        await to_the_first_progress_line(pod, health, prober, caplog)
        prober.answer = OK
        await until(lambda: record.state is RankState.READY, "ready")
        assert ready == [record.current]
        await tasks.cancel_all()

    with caplog.at_level(logging.INFO, logger="supervisor"):
        asyncio.run(scenario())
    assert [r.getMessage() for r in caplog.records if "not ready after" in r.message] == \
        ["rank 0 not ready after 31 s: INFO started"]
    assert prober.asked[0] == f"{pod.record(0).spec.url}/health"


def test_a_start_that_makes_no_progress_says_where_its_server_waits(caplog):
    """Seen with real vLLM: a restarted rank's server asleep in sched_setaffinity for minutes."""
    pod = Pod(*FAST_PROBES)
    prober, ready = ScriptedProber(REFUSED), []
    health, tasks = health_of(pod, prober, ready)
    process = pod.record(0).current.process
    process.samples = [{"cpu_s": 0.37, "output_lines": 3, "state": "S", "wchan": "do_sched_setaffinity",
                        "no_progress_for_s": 35.0}]

    async def scenario() -> None:
        await to_the_first_progress_line(pod, health, prober, caplog)
        await tasks.cancel_all()

    with caplog.at_level(logging.INFO, logger="supervisor"):
        asyncio.run(scenario())
    line = next(r.getMessage() for r in caplog.records if "not ready after" in r.message)
    assert line == ("rank 0 not ready after 31 s: INFO started; no CPU used and no output for 35 s (its server's "
                    "state S, asleep in the kernel at do_sched_setaffinity)")
    assert process.starting_readout["wchan"] == "do_sched_setaffinity"


def test_an_old_attempts_loop_never_reads_the_new_attempt_as_its_own(caplog):
    """Seen as a user: 0.65 s after a rank restarted, the old attempt's loop read the new attempt's
    `starting` from the shared record and logged "rank 1 not ready after 38 s" with its own age."""
    pod = Pod("--restart-policy", "on-failure", *FAST_PROBES)
    prober, ready = ScriptedProber(OK), []
    health, tasks = health_of(pod, prober, ready)

    async def scenario() -> None:
        record = pod.record(1)
        old = record.current
        health.watch(record, old)
        await until(lambda: record.state is RankState.READY, "the first attempt ready")
        pod.clock.now += 8
        pod.report(Exited, 1, -signal.SIGKILL)  # it crashes; a restart is ordered
        prober.answer = REFUSED  # the new attempt loads
        pod.restart(record.group)
        assert record.current is not old and record.state is RankState.STARTING
        pod.clock.now += 30  # the old loop's attempt began 38 s ago
        await until(lambda: not len(tasks), "the old attempt's loop to end")

    with caplog.at_level(logging.INFO, logger="supervisor"):
        asyncio.run(scenario())
    assert not [r.getMessage() for r in caplog.records if "not ready after" in r.message]


def test_the_routers_word_cuts_the_wait_for_the_next_probe_short():
    pod = Pod("--probe-interval", "3600", "--startup-probe-interval", "0.005", "--deep-probe-interval", "0")
    prober, ready = ScriptedProber(OK), []
    health, tasks = health_of(pod, prober, ready)

    async def scenario() -> None:
        record = pod.record(0)
        health.watch(record, record.current)
        await until(lambda: record.state is RankState.READY and len(prober.asked) == 2, "ready and probed once more")
        record.current.probe_soon.set()  # what Machine.report(Unreachable) does for a ready rank
        await until(lambda: len(prober.asked) == 3, "a probe at once, not in an hour")
        await tasks.cancel_all()

    asyncio.run(scenario())


@pytest.mark.parametrize("answer", [OK, REFUSED])
def test_a_loop_for_an_attempt_that_is_not_current_does_not_probe(answer):
    pod = Pod("--restart-policy", "on-failure", *FAST_PROBES)
    prober, ready = ScriptedProber(answer), []
    health, tasks = health_of(pod, prober, ready)
    record = pod.record(0)
    old = record.current
    pod.report(Exited, 0, 1)
    pod.restart(record.group)

    async def scenario() -> None:
        health.watch(record, old)
        await until(lambda: not len(tasks), "the loop to end")

    asyncio.run(scenario())
    assert prober.asked == []
