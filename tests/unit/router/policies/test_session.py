"""router/policies/session.py: the session a request belongs to, and its turns on one rank. Pure."""

from __future__ import annotations

import json

from policies_fakes import routed

from vllm_dp_supervisor.router.policies.load import Load
from vllm_dp_supervisor.router.policies.session import Session, session_key
from vllm_dp_supervisor.router.routes import body_json


def test_session_key_prefers_the_header_then_the_user_field():
    body = json.dumps({"user": "alice", "prompt": "p"}).encode()
    assert session_key([(b"X-Session-ID", b" s-1 ")], b"x-session-id", body_json(body)) == b"h:s-1"
    assert session_key([], b"x-session-id", body_json(body)) == b"u:alice"
    assert session_key([(b"X-Session-ID", b"")], b"x-session-id", body_json(b'{"prompt": "p"}')) is None


def test_a_session_s_turns_go_to_one_rank_and_a_request_without_one_by_load():
    policy = Session(Load(1.25), "X-Conv")
    turns = {policy.pick(routed(json.dumps({"prompt": str(i)}).encode(), headers=[(b"x-conv", b"c-7")]),
                         [0, 1, 2]) for i in range(6)}
    by_user = {policy.pick(routed(json.dumps({"prompt": str(i), "user": "bob"}).encode()), [0, 1, 2])
               for i in range(6)}
    assert len(turns) == 1 and len(by_user) == 1 and policy.placed == {"home": 12}
    policy.load.inflight.update({0: 1, 1: 0, 2: 1})
    assert policy.pick(routed(b'{"prompt": "x"}'), [0, 1, 2]) == 1
