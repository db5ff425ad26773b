"""router/proxy.py: what a worker's requests share: picking among ready ranks not yet failed,
waiting for a view, a restarted rank as new, stalls per rank."""

from __future__ import annotations

import asyncio

from router_fakes import ScriptedPool, router

from vllm_dp_supervisor.router.client import Request

REQUEST = Request(b"POST", b"/v1/completions", b"/v1/completions", True, [], b'{"prompt": "x"}', True, 0.0)


def test_pick_skips_the_ranks_a_request_failed_on_and_waits_for_a_view_that_brings_one():
    async def go():
        made, _ = router(ScriptedPool({}), ranks=(0, 1), policy="least-requests")
        assert await made.pick(REQUEST, {0}, asyncio.get_running_loop().time() + 1) == 1
        assert await made.pick(REQUEST, {0, 1}, 0.0) is None  # none left, and no time to wait
        waiting = asyncio.ensure_future(made.pick(REQUEST, {0, 1}, asyncio.get_running_loop().time() + 30))
        await asyncio.sleep(0)
        made.update({0: (8000, 1), 1: (8001, 1), 2: (8002, 1)})
        return await waiting
    assert asyncio.run(go()) == 2


def test_a_rank_that_failed_a_request_is_a_candidate_again_once_restarted():
    async def go():
        made, _ = router(ScriptedPool({}))
        failed = {(0, 1), (1, 1)}
        before = made.still_failed(failed)
        made.update({0: (8000, 2), 1: (8001, 1)})  # rank 0's new attempt
        return before, made.still_failed(failed)
    assert asyncio.run(go()) == ({0, 1}, {1})


def test_a_rank_holding_requests_and_silent_for_the_stall_timeout_is_stalled():
    async def go():
        made, _ = router(ScriptedPool({}), options=("--stall-timeout", "3"))
        quiet, busy = made._activity(0), made._activity(1)
        quiet.sent(10.0)
        busy.sent(10.0)
        busy.byte(12.5)
        return made.stalled(13.5)
    assert asyncio.run(go()) == {0: (3.5, 1)}
