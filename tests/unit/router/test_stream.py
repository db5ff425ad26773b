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
            ids += choice.get("token_ids") or []
            finish = choice.get("finish_reason") or finish
    assert done and len(heads) == 1
    return {"text": text, "ids": ids, "finish": finish, "usage": usage}


REQUESTS = st.fixed_dictionaries({
    "chat": st.booleans(), "stop": st.lists(st.text(alphabet=" abcde", min_size=1, max_size=3), max_size=2),
    "max_tokens": st.none() | st.integers(1, 30), "ids": st.booleans(), "usage": st.booleans(),
    "keep_stop": st.booleans(), "min_tokens": st.integers(0, 4), "unicode": st.booleans()})


def whole_point(stream: Stream) -> tuple[int, int]:
    """The point a continuation starts from, as the passage finds it with a rank's /detokenize."""
    return next(p for p in stream.seam.points(16) if p[0] == 0 or
                not model.detokenize(stream.generated[:p[0]]).endswith("\ufffd"))


@settings(max_examples=400)
@given(REQUESTS, st.floats(0, 1), st.integers(1, 50))
def test_a_stream_cut_anywhere_reads_as_the_uninterrupted_answer(spec, where, piece):
    """In ASCII and in characters of 2-4 byte tokens (the stand-in's unicode model, its text held
    back and its prompt leaked as vLLM's detokenizer does)."""
    model.CHARACTERS = model.UNICODE if spec["unicode"] else None
    try:
        cut_anywhere(spec, where, piece)
    finally:
        model.CHARACTERS = None


def cut_anywhere(spec: dict, where: float, piece: int) -> None:
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
        point = whole_point(stream)
        body = continuation.body(plan, stream.prompt_ids or [], stream.generated[:point[0]], context=4096)
        assert body is not None and stream.prompt_ids is not None
        stream.seam.resume_at(point, stream.generated)
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
    for off in ({"n": 1}, {"logprobs": None}, {"tool_choice": "none"}, {"echo": False}, {"presence_penalty": 0},
                {"frequency_penalty": 0.0}, {"repetition_penalty": 1.2}, {"include_stop_str_in_output": True}):
        assert plan_of(b"/v1/chat/completions", json.dumps({**chat, **off}).encode(), True) is not None, off
    # counted over output tokens only (the continuation would forget them), media not in the ids,
    # an empty stop string (vLLM's 400 must reach the client), a completion's logprobs 0 (asks for them)
    image = [{"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {"url": "data:x"}}]
    for shape in ({"presence_penalty": 0.5}, {"frequency_penalty": -1}, {"stop": [""]}, {"stop": ["a", ""]},
                  {"messages": [{"role": "user", "content": image}]},
                  {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}):
        assert plan_of(b"/v1/chat/completions", json.dumps({**chat, **shape}).encode(), True) is None, shape
    text_parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert plan_of(b"/v1/chat/completions", json.dumps({**chat, **text_parts}).encode(), True) is not None
    assert plan_of(b"/v1/completions", b'{"prompt": "x", "stream": true, "logprobs": 0}', True) is None


def test_the_limit_is_read_as_vllm_reads_it():
    def limit(path: bytes, **fields) -> int | None:
        body = {"stream": True, **({"messages": []} if b"chat" in path else {"prompt": "x"}), **fields}
        plan = plan_of(path, json.dumps(body).encode())
        assert plan is not None
        return plan.max_tokens
    assert limit(b"/v1/completions") == 16 and limit(b"/v1/completions", max_tokens=None) == 16
    assert limit(b"/v1/completions", max_tokens=5) == 5
    assert limit(b"/v1/chat/completions") is None  # the rest of the context: the passage asks /v1/models
    assert limit(b"/v1/chat/completions", max_completion_tokens=None, max_tokens=7) == 7
    assert limit(b"/v1/chat/completions", max_completion_tokens=3, max_tokens=7) == 3


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
                    "return_token_ids": True, "stream_options": {"include_usage": True},
                    "presence_penalty": 0, "frequency_penalty": 0}  # explicit: no model default applies
    assert continuation.body(plan, [1], list(range(10))) is None  # its limit was reached
    no_limit = plan_of(b"/v1/chat/completions", b'{"messages": [], "stream": true}', True)
    assert no_limit is not None and continuation.body(no_limit, [1], []) is None  # no limit can be set
    assert json.loads(continuation.body(no_limit, [1, 2], [3], context=100) or b"")["max_tokens"] == 97
    # ranks that schedule by priority: the continuation goes one step ahead of its own priority
    assert "priority" not in json.loads(continuation.body(plan, [1, 2], [3]) or b"{}")
    assert json.loads(continuation.body(plan, [1, 2], [3], ahead=True) or b"{}")["priority"] == -1


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


def test_a_usage_block_the_rank_sends_unasked_still_reaches_the_client_with_the_whole_counts():
    """A rank run with --enable-force-include-usage sends usage to every stream."""
    asked = b'{"prompt": "hi", "stream": true, "max_tokens": 6}'
    plan = continuation.plan(routed(asked), True, force_usage=True)
    assert plan is not None and plan.usage and not plan_of(b"/v1/completions", asked).usage
    forced = {**json.loads(plan.upstream_body()), "stream_options": {"include_usage": True}}
    events = rank_answers(forced, chat=False).split(b"\n\n")
    stream = Stream(plan)
    out = stream.feed(b"\n\n".join(events[:3]) + b"\n\n")
    point = whole_point(stream)
    body = json.loads(continuation.body(plan, stream.prompt_ids or [], stream.generated[:point[0]]) or b"{}")
    stream.seam.resume_at(point, stream.generated)
    stream.restart()
    out += stream.feed(rank_answers(body, chat=False), continuation=True)
    usage = client_reads(out)["usage"]
    assert usage == {"prompt_tokens": len(stream.prompt_ids or []), "completion_tokens": 6,
                     "total_tokens": len(stream.prompt_ids or []) + 6}


def test_a_continuation_s_cached_tokens_are_of_its_own_prompt_and_not_passed_on():
    plan = plan_of(b"/v1/completions", b'{"prompt": "hi", "stream": true, "stream_options": {"include_usage": true}}')
    assert plan is not None
    stream = Stream(plan)
    stream.feed(b"\n\n".join(rank_answers(json.loads(plan.upstream_body()), chat=False).split(b"\n\n")[:2]) + b"\n\n")
    stream.restart()
    usage = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12,
             "prompt_tokens_details": {"cached_tokens": 9}}
    out = stream.feed(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n", continuation=True)
    sent = json.loads(out[6:])["usage"]
    assert "prompt_tokens_details" not in sent and sent["prompt_tokens"] == len(stream.prompt_ids or [])


@pytest.mark.parametrize("chat", [False, True])
def test_the_rank_is_asked_the_client_s_usage_options_and_its_usage_chunk_keeps_its_fingerprint(chat):
    """vLLM moves system_fingerprint from the final chunk to the usage chunk under include_usage:
    the router never asks a rank for usage the client did not ask for (it would take the
    fingerprint out of what the client reads), and a usage chunk it writes keeps the rank's."""
    path, asked = (b"/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "stream": true}') \
        if chat else (b"/v1/completions", b'{"prompt": "hi", "stream": true}')
    plan = plan_of(path, asked)
    assert plan is not None and not plan.usage and "stream_options" not in json.loads(plan.upstream_body())
    kept = plan_of(path, json.dumps({**json.loads(asked), "stream_options": {"continuous_usage_stats": True}}).encode())
    # vLLM sends no usage at all without include_usage, continuous_usage_stats or not: it stays so
    assert kept is not None and not kept.continuous_usage
    usage_asked = plan_of(path, json.dumps({**json.loads(asked), "stream_options": {"include_usage": True}}).encode())
    assert usage_asked is not None
    stream = Stream(usage_asked)
    events = rank_answers(json.loads(usage_asked.upstream_body()), chat).split(b"\n\n")
    usage_event = next(e for e in events if b'"usage"' in e)
    fingerprinted = usage_event.replace(b'"usage"', b'"system_fingerprint": "vllm-0.32-abc", "usage"', 1)
    out = stream.feed(b"\n\n".join(e if e != usage_event else fingerprinted for e in events))
    assert client_reads(out)["usage"] and b'"system_fingerprint":"vllm-0.32-abc"' in out


PIECES = [("東", [101, 102]), ("", [103]), ("京 😀", [104, 105]), (" done.", [106])]  # text held back once
PROMPT_IDS = [1, 2, 3]


def vllm_sse(chat: bool, ids: bool, usage: bool) -> bytes:
    """A stream as vLLM 0.32 writes it (its own classes and serving code's choices), with or
    without return_token_ids, with or without include_usage (system_fingerprint where it goes)."""
    chat_p = pytest.importorskip("vllm.entrypoints.openai.chat_completion.protocol")
    from vllm.entrypoints.generate.base.protocol import DeltaMessage
    from vllm.entrypoints.openai.completion.protocol import CompletionResponseStreamChoice, CompletionStreamResponse
    from vllm.entrypoints.serve.engine.protocol import UsageInfo
    fingerprint, out = "fp-1", []
    head = {"id": "x-1", "created": 7, "model": "m"}
    if chat:
        first = chat_p.ChatCompletionStreamResponse(
            **head, object="chat.completion.chunk", prompt_token_ids=PROMPT_IDS if ids else None, prompt_text=None,
            choices=[chat_p.ChatCompletionResponseStreamChoice(
                index=0, delta=DeltaMessage(role="assistant", content=""), logprobs=None, finish_reason=None)])
        out.append(first.model_dump_json(exclude_unset=True))
    for i, (text, tokens) in enumerate(PIECES):
        last = i == len(PIECES) - 1
        if chat:
            extra = {"finish_reason": "stop", "stop_reason": None} if last else {"finish_reason": None}
            chunk = chat_p.ChatCompletionStreamResponse(**head, object="chat.completion.chunk", choices=[
                chat_p.ChatCompletionResponseStreamChoice(index=0, delta=DeltaMessage(content=text), logprobs=None,
                                                          token_ids=tokens if ids else None, **extra)])
        else:
            chunk = CompletionStreamResponse(**head, object="text_completion", choices=[CompletionResponseStreamChoice(
                index=0, text=text, logprobs=None, finish_reason="stop" if last else None, stop_reason=None,
                prompt_token_ids=PROMPT_IDS if ids and i == 0 else None, token_ids=tokens if ids else None)])
        if last and not usage:
            chunk.system_fingerprint = fingerprint
        out.append(chunk.model_dump_json(exclude_unset=True))
    if usage:
        generated = sum(len(t) for _, t in PIECES)
        counts = UsageInfo(prompt_tokens=3, completion_tokens=generated, total_tokens=3 + generated)
        if chat:
            final = chat_p.ChatCompletionStreamResponse(**head, object="chat.completion.chunk", choices=[],
                                                        usage=counts, system_fingerprint=fingerprint)
            out.append(final.model_dump_json(exclude_unset=True, exclude_none=True))
        else:
            final = CompletionStreamResponse(**head, choices=[], usage=counts, system_fingerprint=fingerprint)
            out.append(final.model_dump_json(exclude_unset=False, exclude_none=True))
    return b"".join(b"data: " + e.encode() + b"\n\n" for e in out) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("usage", [False, True])
@pytest.mark.parametrize("chat", [True, False])
def test_a_client_that_did_not_ask_token_ids_reads_vllm_s_own_bytes(chat, usage):
    """The router asks the rank for token ids (to keep the stream resumable); a client that did
    not ask reads, byte for byte, what vLLM would have sent it: the id fields null."""
    request = {"model": "m", "stream": True, **({"messages": [{"role": "user", "content": "hi"}]} if chat
                                                else {"prompt": "hi"}),
               **({"stream_options": {"include_usage": True}} if usage else {})}
    plan = plan_of(b"/v1/chat/completions" if chat else b"/v1/completions", json.dumps(request).encode())
    assert plan is not None and json.loads(plan.upstream_body())["return_token_ids"] is True
    stream = Stream(plan)
    upstream = vllm_sse(chat, ids=True, usage=usage)
    assert b"".join(stream.feed(upstream[at:at + 7]) for at in range(0, len(upstream), 7)) == \
        vllm_sse(chat, ids=False, usage=usage)
    assert stream.prompt_ids == PROMPT_IDS and stream.generated == [101, 102, 103, 104, 105, 106]


def test_an_error_event_first_leaves_no_head_for_the_next_rank_s_answer():
    plan = plan_of(b"/v1/completions", b'{"prompt": "hi", "stream": true, "stream_options": {"include_usage": true}}')
    assert plan is not None
    stream = Stream(plan)
    with pytest.raises(RankFailed):
        stream.feed(b'data: {"error": {"message": "engine dead", "code": 500}}\n\n')
    assert stream.head == {}
