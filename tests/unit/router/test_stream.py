"""router/stream.py and continuation.py together, without a socket: a stream from the stand-in's model
(the same "model" answers on every rank, as one vLLM checkpoint does) is cut anywhere, continued
from the tokens it had, and the client's side reads as the uninterrupted answer."""

from __future__ import annotations

import json

import pytest
import standin_model as model
from hypothesis import given, settings
from hypothesis import strategies as st
from policies_fakes import routed

from vllm_dp_supervisor.router import continuation
from vllm_dp_supervisor.router.stream import RankFailed, Stream, Unreadable

HEAD = {"id": "chatcmpl-1", "created": 1, "model": "m", "object": "chat.completion.chunk"}
ANSWER = 24  # tokens of an answer the model ends by itself


def plan_of(path: bytes, body: bytes, allowed: bool = True) -> continuation.Plan | None:
    return continuation.plan(routed(body, path), allowed)


def rank_answers(request: dict, chat: bool) -> bytes:
    head = {**HEAD, "object": "chat.completion.chunk" if chat else "text_completion"}
    events = model.events(request, chat, ANSWER, head)
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def client_reads(data: bytes) -> dict:
    """What a client makes of a stream: its text, token ids, finish reason, usage, ids."""
    text, ids, finish, usage, heads, done = "", [], None, None, set(), False
    for event in data.split(b"\n\n"):
        if not event:
            continue
        assert event.startswith(b"data: ") and not done
        if event == b"data: [DONE]":
            done = True
            continue
        chunk = json.loads(event[6:])
        heads.add((chunk["id"], chunk["created"], chunk["model"], chunk["object"]))
        usage = chunk.get("usage", usage)
        for choice in chunk["choices"]:
            text += choice["delta"].get("content") or "" if "delta" in choice else choice["text"]
            ids += choice.get("token_ids", [])
            finish = choice.get("finish_reason") or finish
    assert done and len(heads) == 1
    return {"text": text, "ids": ids, "finish": finish, "usage": usage}


REQUESTS = st.fixed_dictionaries({
    "chat": st.booleans(), "stop": st.lists(st.text(alphabet=" abcde", min_size=1, max_size=3), max_size=2),
    "max_tokens": st.none() | st.integers(1, 30), "ids": st.booleans(), "usage": st.booleans(),
    "keep_stop": st.booleans(), "min_tokens": st.integers(0, 4)})


@settings(max_examples=400)
@given(REQUESTS, st.floats(0, 1), st.integers(1, 50))
def test_a_stream_cut_anywhere_reads_as_the_uninterrupted_answer(spec, where, piece):
    chat = spec["chat"]
    request = {"model": "m", "stream": True, **({"messages": [{"role": "user", "content": "hi"}]} if chat
                                                else {"prompt": "hi"})}
    for key, value in (("stop", spec["stop"]), ("max_tokens", spec["max_tokens"]),
                       ("include_stop_str_in_output", spec["keep_stop"]), ("min_tokens", spec["min_tokens"])):
        if value:
            request[key] = value
    if spec["ids"]:
        request["return_token_ids"] = True
    if spec["usage"]:
        request["stream_options"] = {"include_usage": True}
    path = b"/v1/chat/completions" if chat else b"/v1/completions"
    plan = plan_of(path, json.dumps(request).encode(), allowed=True)
    assert plan is not None
    uninterrupted = client_reads(rank_answers(request, chat))

    first = rank_answers(json.loads(plan.upstream_body()), chat)
    cut = first[:int(len(first) * where)]
    stream, out = Stream(plan), b""
    for at in range(0, len(cut), piece):
        out += stream.feed(cut[at:at + piece])
    if not out:  # nothing reached the client: the request is sent again whole (passage.py)
        stream = Stream(plan)
        out = stream.feed(first)
    elif not stream.done and stream.finish is not None:  # cut after its last token
        out += stream.end()
    elif not stream.done:
        body = continuation.body(plan, stream.prompt_ids or [], stream.generated)
        assert body is not None and stream.prompt_ids is not None
        stream.restart()
        out += stream.feed(rank_answers(json.loads(body), chat=False), continuation=True)
    got = client_reads(out)
    assert got["text"] == uninterrupted["text"]
    assert got["finish"] == uninterrupted["finish"]
    assert got["usage"] == uninterrupted["usage"]
    assert got["ids"] == (uninterrupted["ids"] if spec["ids"] else [])


def test_what_cannot_continue_is_left_as_it_was():
    chat = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    allowed = json.dumps(chat).encode()
    assert plan_of(b"/v1/chat/completions", allowed, allowed=True) is not None
    assert plan_of(b"/v1/chat/completions", allowed, allowed=False) is None  # a parser in the ranks
    for extra in ({"n": 2}, {"logprobs": True}, {"tools": [{"type": "function"}]}, {"tool_choice": "auto"},
                  {"response_format": {"type": "json_object"}}, {"stream": False}, {"best_of": 2}):
        assert plan_of(b"/v1/chat/completions", json.dumps({**chat, **extra}).encode(), True) is None, extra
    for prompt in (["a", "b"], [[1, 2]], None):
        body = json.dumps({"prompt": prompt, "stream": True}).encode()
        assert plan_of(b"/v1/completions", body, True) is None, prompt
    assert plan_of(b"/v1/completions", b'{"prompt": [1, 2], "stream": true, "echo": true}', True) is None
    assert plan_of(b"/v1/embeddings", b'{"input": "x", "stream": true}', True) is None
    assert plan_of(b"/v1/completions", b"not json", True) is None
    for off in ({"n": 1}, {"logprobs": None}, {"tool_choice": "none"}, {"echo": False}):
        assert plan_of(b"/v1/chat/completions", json.dumps({**chat, **off}).encode(), True) is not None, off


def test_a_continuation_carries_the_sampling_and_the_rest_of_the_limit():
    request = {"messages": [], "stream": True, "temperature": 0.7, "seed": 3, "top_k": 5, "max_tokens": 10,
               "min_tokens": 4, "stop": ["x"], "logit_bias": {"7": 1}, "tool_choice": None, "user": "u"}
    plan = plan_of(b"/v1/chat/completions", json.dumps(request).encode(), True)
    assert plan is not None
    sent = json.loads(plan.upstream_body())
    assert sent["return_token_ids"] is True and "stop" not in sent  # the router applies the stops
    body = json.loads(continuation.body(plan, [1, 2], [3, 4, 5]) or b"{}")
    assert body == {"temperature": 0.7, "seed": 3, "top_k": 5, "logit_bias": {"7": 1}, "user": "u",
                    "prompt": [1, 2, 3, 4, 5], "max_tokens": 7, "min_tokens": 1, "stream": True,
                    "return_token_ids": True, "stream_options": {"include_usage": True}}
    assert continuation.body(plan, [1], list(range(10))) is None  # its limit was reached
    no_limit = plan_of(b"/v1/chat/completions", b'{"messages": [], "stream": true}', True)
    assert no_limit is not None and json.loads(continuation.body(no_limit, [1], []) or b"")["max_tokens"] is None


@pytest.mark.parametrize("data", [b"data: not json\n\n", b"data: [1]\n\n", b'data: {"choices": 3}\n\n'])
def test_a_stream_the_router_cannot_read_says_so(data):
    plan = plan_of(b"/v1/completions", b'{"prompt": "x", "stream": true}', True)
    assert plan is not None
    with pytest.raises(Unreadable):
        Stream(plan).feed(data)


def test_an_error_event_mid_stream_is_a_failed_rank_and_what_came_before_still_goes_out():
    """vLLM sends an error event when its engine dies under a stream: it is not passed on, the
    stream continues elsewhere, and the events before it in the same read are not lost."""
    plan = plan_of(b"/v1/completions", b'{"prompt": "hi", "stream": true}', True)
    assert plan is not None
    first = rank_answers(json.loads(plan.upstream_body()), chat=False).split(b"\n\n")
    stream = Stream(plan)
    with pytest.raises(RankFailed, match="EngineCore died") as failed:
        stream.feed(b"\n\n".join(first[:2]) + b'\n\ndata: {"error": {"message": "EngineCore died"}}\n\n')
    assert failed.value.before.count(b"data: ") == 2 and len(stream.generated) == 2 and stream.resumable


@pytest.mark.parametrize("reason", ["abort", "error"])
@pytest.mark.parametrize("then", [b"data: [DONE]\n\n", b'data: {"error": {"message": "EngineDeadError"}}\n\n'])
def test_a_finish_reason_that_says_the_rank_stopped_it_is_a_cut_not_an_end(reason, then):
    """Seen with real vLLM: an EngineCore SIGKILLed under a stream, its server sent a last chunk
    with finish_reason "abort" and then [DONE]; taken as the end, the client read a truncated
    answer as whole. The chunk goes out without that reason, and the rest continues elsewhere."""
    plan = plan_of(b"/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], '
                       b'"stream": true}', True)
    assert plan is not None
    first = rank_answers(json.loads(plan.upstream_body()), chat=True).split(b"\n\n")
    stopped = json.loads(first[2][6:])
    stopped["choices"][0].update(finish_reason=reason, delta={"content": ""}, token_ids=[])
    stream = Stream(plan)
    before = stream.feed(b"\n\n".join(first[:2]) + b"\n\n")
    generated = list(stream.generated)
    with pytest.raises(RankFailed) as failed:
        stream.feed(b"data: " + json.dumps(stopped).encode() + b"\n\n" + then)
    assert reason.encode() not in before + failed.value.before
    assert stream.finish is None and stream.resumable and stream.generated == generated != []
    stream.restart()
    assert stream.stopped_under_it is None


def test_done_without_a_finish_reason_is_a_cut_not_an_end():
    """vLLM ends every whole answer with a finish reason; a [DONE] straight after a token is a
    rank that stopped under it (the stand-in's --standin-done-mid-stream)."""
    plan = plan_of(b"/v1/completions", b'{"prompt": "hi", "stream": true}', True)
    assert plan is not None
    first = rank_answers(json.loads(plan.upstream_body()), chat=False).split(b"\n\n")
    stream = Stream(plan)
    stream.feed(b"\n\n".join(first[:3]) + b"\n\n")
    with pytest.raises(RankFailed, match="without a finish reason"):
        stream.feed(b"data: [DONE]\n\n")
    assert stream.resumable and not stream.done and len(stream.generated) == 3
