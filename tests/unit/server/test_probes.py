"""server/probes.py: vLLM's answers read as what they say of its engine."""

from __future__ import annotations

import json

from vllm_dp_supervisor.server.probes import ProbeFailure, ProbeResult, engine_died, token_total

DEAD = json.dumps({"error": {"message": "EngineCore encountered an issue. See stack trace (above) for the root "
                             "cause.", "type": "InternalServerError", "param": None, "code": 500}}).encode()


def test_vllm_s_engine_dead_answer_is_the_rank_s_failure_not_the_request_s():
    assert engine_died(500, DEAD)
    assert not engine_died(400, DEAD)  # a client error that quotes it is the client's
    assert not engine_died(500, b'{"error": {"message": "CUDA out of memory"}}')


def test_a_503_from_health_is_a_dead_engine_and_other_failures_are_not():
    assert ProbeResult(ProbeFailure.STATUS, 503, 1.0).engine_dead
    assert not ProbeResult(ProbeFailure.STATUS, 500, 1.0).engine_dead
    assert not ProbeResult(ProbeFailure.TIMEOUT, None, 1.0).engine_dead


def test_token_counters_are_summed_and_their_absence_is_none():
    text = 'vllm:prompt_tokens_total{engine="0"} 10.0\nvllm:generation_tokens_total{engine="0"} 5.0\nx 1\n'
    assert token_total(text) == 15.0 and token_total("x 1\n") is None
