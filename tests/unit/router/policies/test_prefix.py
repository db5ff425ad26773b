"""router/policies/prefix.py: the key a request's prompt gives, read as the model will read it,
and any body a key or none, never an error. Pure."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from policies_fakes import routed

from vllm_dp_supervisor.router.policies.load import Load
from vllm_dp_supervisor.router.policies.prefix import Prefix, prompt_prefix
from vllm_dp_supervisor.router.routes import body_json


def prefix(body: bytes, chars: int) -> bytes | None:
    return prompt_prefix(body_json(body), chars)


def chat(*messages: tuple[str, str], **extra) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": r, "content": c} for r, c in messages], **extra}).encode()


def test_prompt_prefix_reads_completions_and_chats_as_the_model_will():
    system = "You are a ship's pilot. " * 100
    a = prefix(chat(("system", system), ("user", "Where is the port?")), 1024)
    b = prefix(chat(("system", system), ("user", "How deep is it?")), 1024)
    assert a == b and a is not None and len(a) == 1024  # same system prompt: same key
    short_a = prefix(chat(("system", "Be brief."), ("user", "Where is the port?")), 1024)
    short_b = prefix(chat(("system", "Be brief."), ("user", "How deep is it?")), 1024)
    assert short_a != short_b  # the first K characters differ: placed apart
    parts = [{"type": "text", "text": system}, {"type": "image_url", "image_url": {"url": "x"}}]
    assert prefix(json.dumps({"messages": [{"role": "system", "content": parts}]}).encode(), 1024) == \
        prefix(chat(("system", system)), 1024)
    assert prefix(json.dumps({"prompt": "abc" * 1000}).encode(), 10) == b"abcabcabca"
    assert prefix(json.dumps({"prompt": ["first", "second"]}).encode(), 10) == b"first"
    assert prefix(json.dumps({"prompt": list(range(1000))}).encode(), 40).startswith(b"tokens:0,1,2")


@given(st.binary(max_size=300) | st.builds(lambda v: json.dumps(v).encode(), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["prompt", "messages", "role", "content", "text", "user"]), children, max_size=4),
    max_leaves=20)))
@settings(max_examples=300)
def test_any_body_gives_a_key_or_none_never_an_error(body):
    for chars in (1, 1024):
        key = prefix(body, chars)
        assert key is None or isinstance(key, bytes)
    assert Prefix(Load(1.25), 1024).pick(routed(body), [0, 1]) in (0, 1)


def test_a_body_that_is_not_a_json_object_has_no_key():
    assert prefix(b'[1, 2]', 10) is None and prefix(b"\xff\xfe", 10) is None




def test_requests_sharing_a_long_system_prompt_meet_on_one_rank_and_a_get_goes_by_load():
    policy = Prefix(Load(1.25), 1024)
    system = "You are a ship's pilot. " * 100
    picks = {policy.pick(routed(chat(("system", system), ("user", q))), [0, 1, 2, 3]) for q in "abcdefgh"}
    assert len(picks) == 1 and policy.placed == {"home": 8}
    policy.load.inflight.update({0: 2, 1: 2, 2: 0, 3: 2})
    assert policy.pick(routed(b"", b"/v1/models", b"GET"), [0, 1, 2, 3]) == 2 and policy.placed == {"home": 8}
