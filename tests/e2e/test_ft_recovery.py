"""vLLM's in-engine recovery (--enable-fault-tolerance), orchestrated by the supervisor (stand-in)."""

from __future__ import annotations

import signal

import pytest
from harness import FAST, NEVER, wait_for

FT = ["--mode", "dp", "--probe-interval", "0.2"]
FT_ARGS = ("--enable-fault-tolerance", "--standin-ft-fault-after", "1", "--standin-ranks", "1")


def test_faulted_engine_is_recovered_in_place_and_the_group_is_unready_meanwhile(start):
    run = start(2, *FT_ARGS, options=FT)
    pids = [r["pid"] for r in run.wait_ready()["ranks"]]
    _, body = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(run.get("/ready")), 5, "unready")
    assert body["not_ready"] == [{"rank": 0, "state": "recovering"}, {"rank": 1, "state": "recovering"}]
    # a state of its own now, not a flag beside "ready": each change is logged and published
    wait_for(lambda: run.all_ready(), 5, "ready again after the retry")
    out = run.output()
    assert "rank 1 recovering: engine fault in rank 1's group" in out
    assert "rank 0 ready: in-engine recovery done" in out
    assert [r["pid"] for r in run.status()["ranks"]] == pids  # recovered, not restarted
    assert "[rank1] standin: fault tolerance retry received (engine unhealthy)" in run.output()
    assert "[rank0] standin: fault tolerance retry received (engine healthy)" in run.output()  # every rank
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]
    assert "rank 1: in-engine recovery done; group [0, 1] ready again" in run.output()


@pytest.mark.parametrize("variant,why", [
    (["--standin-ft-recovery", "fails"], "in-engine recovery failed (rank 1: collective op failed during retry)"),
    (["--standin-ft-recovery", "hangs"], "in-engine recovery failed (not healthy 1 s after the retry"),
    (["--standin-ft-dead"], "in-engine recovery failed (an engine is dead, not recoverable)"),
])
def test_failed_recovery_falls_back_to_restarting_the_group(start, variant, why):
    run = start(2, *FT_ARGS, *variant, options=[*FT, *FAST, "--ft-recovery-timeout", "1"])
    pids = [r["pid"] for r in run.wait_ready()["ranks"]]
    wait_for(lambda: all(r["attempt"] == 1 and r["state"] == "ready" for r in run.status()["ranks"]), 15,
             "the group restarted")
    assert not set(pids) & {r["pid"] for r in run.status()["ranks"]}
    assert why in run.output()
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


def test_failed_recovery_without_a_restart_policy_stops_the_pod(start):
    run = start(2, *FT_ARGS, "--standin-ft-dead", options=[*NEVER, *FT])
    run.wait_ready()
    assert run.wait_exit(10) == 3, run.output()[-4000:]
    assert "exiting with code 3: rank 1: in-engine recovery failed (an engine is dead" in run.output()
