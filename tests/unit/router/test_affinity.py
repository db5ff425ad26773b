"""router/affinity.py and the keyed side of balance.py: where a key goes, the bound on load,
what moves when a rank leaves, and how keys are read from requests. Pure, with hypothesis."""

from __future__ import annotations

import json
import math
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_dp_supervisor.router.affinity import key_hash, place, prompt_prefix, session_key
from vllm_dp_supervisor.router.balance import Balancer
from vllm_dp_supervisor.settings.config import RouterPolicy

RANKS = st.lists(st.integers(0, 63), min_size=1, max_size=8, unique=True)
LOADS = st.dictionaries(st.integers(0, 63), st.integers(0, 50))
KEYS = st.integers(0, (1 << 64) - 1)


@given(key=KEYS, ranks=RANKS, loads=LOADS, bound=st.floats(1.0, 3.0))
def test_a_key_never_pushes_a_rank_above_the_bound(key, ranks, loads, bound):
    rank, home = place(key, ranks, loads, bound)
    assert rank in ranks
    total = sum(loads.get(r, 0) for r in ranks) + 1
    assert loads.get(rank, 0) + 1 <= math.ceil(bound * total / len(ranks))
    if home:  # its first choice: the same rank whatever the load, when the load allows
        assert rank == place(key, ranks, {}, bound)[0]


@given(key=KEYS, ranks=RANKS)
def test_with_equal_load_a_key_always_goes_to_the_same_rank_in_any_order(key, ranks):
    first, home = place(key, ranks, {}, 1.25)
    assert home and place(key, list(reversed(ranks)), {r: 3 for r in ranks}, 1.25)[0] == first


@given(keys=st.lists(KEYS, min_size=1, max_size=50), ranks=st.lists(st.integers(0, 63), min_size=2, max_size=8,
                                                                    unique=True))
def test_a_rank_leaving_moves_only_its_own_keys_and_they_come_back(keys, ranks):
    before = {k: place(k, ranks, {}, 1.25)[0] for k in keys}
    gone = ranks[0]
    after = {k: place(k, ranks[1:], {}, 1.25)[0] for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != gone)
    assert {k: place(k, ranks, {}, 1.25)[0] for k in keys} == before


def test_distinct_keys_spread_over_every_rank():
    counts = Counter(place(key_hash(b"prompt %d" % i), [0, 1, 2, 3], {}, 1.25)[0] for i in range(4000))
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 850  # 1000 each, give or take


def test_a_hot_key_spills_once_its_rank_is_above_the_bound_and_counts_it():
    balancer = Balancer(RouterPolicy.PREFIX, bound=1.5)
    key = key_hash(b"the same long system prompt")
    for _ in range(30):  # requests that never finish: the worst case for a hot key
        balancer.started(balancer.choose([0, 1, 2], key=key) or 0)
    assert max(balancer.inflight.values()) <= math.ceil(1.5 * 30 / 3)
    assert balancer.placed["home"] >= 15 and balancer.placed["spilled"] > 0
    assert sum(balancer.placed.values()) == 30


def test_a_key_respects_the_ranks_a_request_already_failed_on():
    balancer = Balancer(RouterPolicy.PREFIX)
    key = key_hash(b"x")
    home = balancer.choose([0, 1], key=key)
    assert balancer.choose([0, 1], excluded={home}, key=key) == 1 - (home or 0)
    assert balancer.choose([0, 1], excluded={0, 1}, key=key) is None


def chat(*messages: tuple[str, str], **extra) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": r, "content": c} for r, c in messages], **extra}).encode()


def test_prompt_prefix_reads_completions_and_chats_as_the_model_will():
    system = "You are a ship's pilot. " * 100
    a = prompt_prefix(chat(("system", system), ("user", "Where is the port?")), 1024)
    b = prompt_prefix(chat(("system", system), ("user", "How deep is it?")), 1024)
    assert a == b and a is not None and len(a) == 1024  # same system prompt: same key
    short_a = prompt_prefix(chat(("system", "Be brief."), ("user", "Where is the port?")), 1024)
    short_b = prompt_prefix(chat(("system", "Be brief."), ("user", "How deep is it?")), 1024)
    assert short_a != short_b  # the first K characters differ: placed apart
    parts = [{"type": "text", "text": system}, {"type": "image_url", "image_url": {"url": "x"}}]
    assert prompt_prefix(json.dumps({"messages": [{"role": "system", "content": parts}]}).encode(), 1024) == \
        prompt_prefix(chat(("system", system)), 1024)
    assert prompt_prefix(json.dumps({"prompt": "abc" * 1000}).encode(), 10) == b"abcabcabca"
    assert prompt_prefix(json.dumps({"prompt": ["first", "second"]}).encode(), 10) == b"first"
    assert prompt_prefix(json.dumps({"prompt": list(range(1000))}).encode(), 40).startswith(b"tokens:0,1,2")


@given(st.binary(max_size=300) | st.builds(lambda v: json.dumps(v).encode(), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["prompt", "messages", "role", "content", "text", "user"]), children, max_size=4),
    max_leaves=20)))
@settings(max_examples=300)
def test_any_body_gives_a_key_or_none_never_an_error(body):
    for chars in (1, 1024):
        key = prompt_prefix(body, chars)
        assert key is None or isinstance(key, bytes)
    assert session_key([], b"x-session-id", body) is None or isinstance(session_key([], b"x-session-id", body), bytes)


def test_session_key_prefers_the_header_then_the_user_field():
    body = json.dumps({"user": "alice", "prompt": "p"}).encode()
    assert session_key([(b"X-Session-ID", b" s-1 ")], b"x-session-id", body) == b"h:s-1"
    assert session_key([], b"x-session-id", body) == b"u:alice"
    assert session_key([(b"X-Session-ID", b"")], b"x-session-id", b'{"prompt": "p"}') is None
    assert prompt_prefix(b'[1, 2]', 10) is None and prompt_prefix(b"\xff\xfe", 10) is None
