"""router/responses.py: which requests name a stored response, and what a worker keeps of where."""

from __future__ import annotations

from pathlib import Path

from policies_fakes import routed

from vllm_dp_supervisor.router.responses import KEPT, Holders, named


def test_what_names_a_stored_response():
    assert named(routed(b'{"input": "hi", "previous_response_id": "resp_1"}', b"/v1/responses")) == "resp_1"
    assert named(routed(b"", b"/v1/responses/resp_2", b"GET")) == "resp_2"
    assert named(routed(b"", b"/v1/responses/resp_3/cancel")) == "resp_3"
    assert named(routed(b"", b"/v1/responses/resp%5F4", b"GET")) == "resp_4"  # decoded, as vLLM routes it
    assert named(routed(b'{"input": "hi"}', b"/v1/responses")) is None
    assert named(routed(b'{"previous_response_id": null}', b"/v1/responses")) is None
    assert named(routed(b'{"previous_response_id": "a b/../x"}', b"/v1/responses")) is None  # never put in a path
    assert named(routed(b'{"previous_response_id": "resp_1"}', b"/v1/chat/completions")) is None
    assert named(routed(b"not json previous_response_id", b"/v1/responses")) is None


def test_a_holder_is_forgotten_when_its_rank_restarts_and_the_oldest_goes_first():
    holders = Holders(kept=2)
    holders.put("a", 0, 3)
    assert holders.get("a", {0: (8000, 3)}) == 0
    assert holders.get("a", {0: (8000, 4)}) is None  # a new attempt holds nothing of the last one
    assert holders.get("a", {1: (8001, 0)}) is None  # its rank is not ready
    holders.put("b", 1, 0)
    holders.put("c", 1, 0)
    assert holders.get("a", {0: (8000, 3)}) is None and holders.get("c", {1: (8001, 0)}) == 1


def test_the_manual_states_how_many_ids_a_worker_keeps():
    manual = (Path(__file__).parents[3] / "docs" / "router.md").read_text()
    assert f"per worker ({KEPT:,} ids" in manual
