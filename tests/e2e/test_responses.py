"""The Responses API's follow-ups through the router (router/responses.py), end to end over stand-in
ranks that store responses in their own process as vLLM does: each follow-up, retrieval and cancel
reaches the rank that holds the response it names, from either router worker; an id no rank holds
gets the rank's own 404."""

from __future__ import annotations

import json

from harness import request


def respond(run, previous: str | None) -> tuple[int, dict, str]:
    body = {"model": "standin-model", "input": "and then?", **({"previous_response_id": previous} if previous else {})}
    status, headers, data = request(run, "POST", "/v1/responses", json.dumps(body).encode(),
                                    {"Content-Type": "application/json"})
    return status, json.loads(data), headers.get("x-dp-rank", "")


def test_follow_ups_find_the_rank_that_holds_their_previous_response(start):
    run = start(2, options=["--router-workers", "2"])
    run.wait_ready()
    status, first, home = respond(run, None)
    assert status == 200, first
    previous, ranks = first["id"], set()
    for _ in range(8):  # least-requests alone would send about half of them to the other rank
        status, answer, rank = respond(run, previous)
        assert status == 200 and rank == home, answer
        assert answer["output"][0]["content"][0]["text"] == f"rank {home} after {previous}"
        previous = answer["id"]
        ranks.add(rank)
    for _ in range(4):
        status, _, data = request(run, "GET", f"/v1/responses/{first['id']}")
        assert status == 200 and json.loads(data)["id"] == first["id"], data
    # a new conversation may go anywhere; one nothing holds gets the rank's own answer, not ours
    status, answer, _ = respond(run, "resp_nobody_0")
    assert status == 404 and answer["error"]["message"] == "Response with id 'resp_nobody_0' not found."
