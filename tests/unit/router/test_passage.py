"""router/passage.py: one request's life over a scripted pool (tests/router_fakes.py), in process:
complete, retry, fail, continue, cut and hand-off, and the step table they follow."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
from router_fakes import (
    JSON,
    SSE,
    RecordingClient,
    ScriptedPool,
    chat_chunk,
    completion_chunk,
    event,
    router,
)

from vllm_dp_supervisor.router.client import Request
from vllm_dp_supervisor.router.exchange import Outcome
from vllm_dp_supervisor.router.passage import Passage, Step, next_step
from vllm_dp_supervisor.server.probes import ENGINE_DEAD_MESSAGE

CHAT = b"/v1/chat/completions"
STREAMED = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                       "max_tokens": 10}).encode()
ANSWER = b'{"choices": [{"text": "ok"}]}'
WHOLE = [("head", 200, [*JSON, (b"content-length", b"%d" % len(ANSWER))]), ("body", ANSWER), ("complete",)]
FIRST_TOKENS = [("head", 200, SSE), ("body", chat_chunk(None, [], prompt_token_ids=[1, 2, 3])),
                ("body", chat_chunk("Hel", [7])), ("body", chat_chunk("lo", [8]))]
REST = [("head", 200, SSE), ("body", completion_chunk(" world", [9])), ("body", completion_chunk("!", [10], "stop")),
        ("body", event("[DONE]")), ("complete",)]


def request(path: bytes = b"/v1/completions", body: bytes = b'{"prompt": "x"}') -> Request:
    return Request(b"POST", path, path, True, [(b"host", b"pod")], body, True, asyncio.get_running_loop().time())


def life(pool: ScriptedPool, path: bytes = b"/v1/completions", body: bytes = b'{"prompt": "x"}',
         options: tuple[str, ...] = ()):
    """Run one request through a passage: (keep-alive?, what the client got, the router, its reports)."""
    async def go():
        made, reports = router(pool, options=options)
        client = RecordingClient()
        keep = await Passage(made, client, request(path, body)).run()  # type: ignore[arg-type]
        return keep, client, made, reports
    return asyncio.run(go())


def test_an_answer_goes_to_the_client_whole_and_is_counted():
    keep, client, made, _ = life(ScriptedPool({0: [WHOLE]}))
    assert keep and client.body() == ANSWER and b"x-dp-rank: 0" in client.written
    assert made.stats.requests == {("0", "2xx", "completions"): 1} and made.load.inflight == {0: 0}


def test_a_rank_that_refuses_the_connection_is_reported_and_the_request_goes_to_another():
    keep, client, made, reports = life(ScriptedPool({0: [None], 1: [WHOLE]}))
    assert keep and client.body() == ANSWER and b"x-dp-rank: 1" in client.written
    assert [r[:2] for r in reports.unreachable] == [(0, 1)] and made.stats.retries == {"unreachable": 1}


def test_a_dead_engine_s_500_is_never_shown_and_a_stateless_request_is_sent_again():
    dead = json.dumps({"error": {"message": ENGINE_DEAD_MESSAGE.decode()}}).encode()
    died = [("head", 500, [*JSON, (b"content-length", b"%d" % len(dead))]), ("body", dead), ("complete",)]
    keep, client, made, reports = life(ScriptedPool({0: [died], 1: [WHOLE]}))
    assert keep and client.body() == ANSWER and ENGINE_DEAD_MESSAGE not in client.written
    assert [r[0] for r in reports.unreachable] == [0]  # its probe is woken
    assert made.stats.retries == {"rank_failed": 1} and made.stats.resumed == {"request": 1}


def test_a_request_that_is_not_stateless_is_not_sent_twice_it_gets_a_502():
    lost = [("lost", "the connection closed")]
    keep, client, made, _ = life(ScriptedPool({0: [lost], 1: [WHOLE]}), path=b"/v1/responses")
    assert client.written.startswith(b"HTTP/1.1 502") and b"rank 0" in client.written and keep
    assert made.stats.requests == {("0", "5xx", "other"): 1} and made.stats.retries == {}


def test_with_no_rank_ready_the_client_gets_a_503_after_the_queue_timeout():
    async def go():
        made, _ = router(ScriptedPool({}), ranks=())
        client = RecordingClient()
        await Passage(made, client, request()).run()  # type: ignore[arg-type]
        return client, made
    client, made = asyncio.run(go())
    assert client.written.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in client.written
    assert made.stats.no_rank == 1


def test_a_stream_cut_mid_way_continues_on_another_rank_from_its_tokens():
    pool = ScriptedPool({0: [[*FIRST_TOKENS, ("lost", "the rank died")]], 1: [REST]})
    keep, client, made, reports = life(pool, CHAT, STREAMED)
    assert keep and chat_text(client.body()) == "Hello world!" and client.body().endswith(b"data: [DONE]\n\n")
    continued = json.loads(sent_to(pool, 1, b"POST /v1/completions ").partition(b"\r\n\r\n")[2])
    assert continued["prompt"] == [1, 2, 3, 7, 8] and continued["max_tokens"] == 8
    assert pool.asked == [(1, b"POST /detokenize HTTP/1.1")]  # its tokens decode whole: from there
    assert reports.resumed == [(0, 1, 2)] and made.stats.resumed == {"stream": 1}
    assert b'"id": "chatcmpl-1"' in client.body() or b'"id":"chatcmpl-1"' in client.body()


def sent_to(pool: ScriptedPool, rank: int, line: bytes) -> bytes:
    return next(c.sent for c in pool.connections if c.rank == rank and c.sent.startswith(line))


def chat_text(body: bytes) -> str:
    chunks = [json.loads(line[6:]) for line in body.split(b"\n\n") if line.startswith(b"data: {")]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c.get("choices"))


KANA = "こん".encode()  # two characters, three byte tokens each (the stand-in's detokenizer)


def test_a_cut_inside_a_character_continues_from_the_last_whole_one_and_nothing_is_sent_twice():
    """The rank sent こ (3 tokens) and the first byte of ん (held back: no text), then died. The
    continuation's prompt ends after こ, never inside ん (vLLM would show the prompt's text)."""
    first = [("head", 200, SSE), ("body", chat_chunk(None, [], prompt_token_ids=[1, 2])),
             ("body", chat_chunk("", [KANA[0]])), ("body", chat_chunk("", [KANA[1]])),
             ("body", chat_chunk("こ", [KANA[2]])), ("body", chat_chunk("", [KANA[3]])), ("lost", "the rank died")]
    rest = [("head", 200, SSE), ("body", completion_chunk("", [KANA[3]])), ("body", completion_chunk("", [KANA[4]])),
            ("body", completion_chunk("ん", [KANA[5]])), ("body", completion_chunk("!", [33], "stop")),
            ("body", event("[DONE]")), ("complete",)]
    body = json.dumps({"model": "m", "messages": [], "stream": True, "return_token_ids": True}).encode()
    pool = ScriptedPool({0: [first], 1: [rest]})
    keep, client, _, _ = life(pool, CHAT, body)
    assert keep and chat_text(client.body()) == "こん!"
    ids = [i for line in client.body().split(b"\n\n") if line.startswith(b"data: {")
           for i in json.loads(line[6:])["choices"][0].get("token_ids", [])]
    assert ids == [*KANA, 33]  # each token once, the repeated one not twice
    continued = json.loads(sent_to(pool, 1, b"POST /v1/completions ").partition(b"\r\n\r\n")[2])
    assert continued["prompt"] == [1, 2, *KANA[:3]]
    assert continued["max_tokens"] == 4096 - 2 - 3  # no limit set: the rest of the context, as vLLM's
    assert len(pool.asked) == 3  # [..., ん's first byte] ends in U+FFFD; [こ] is whole; then /v1/models


def test_a_point_held_back_behind_a_special_token_the_stream_skipped_is_not_taken():
    """/detokenize keeps special tokens; the stream skips them: bytes held back before one decode
    to U+FFFD and the token's text, which does not end in U+FFFD, yet the stream had not sent them."""
    def decode(ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace") + ("<s>" if 300 in ids else "")
    first = [("head", 200, SSE), ("body", chat_chunk(None, [], prompt_token_ids=[1, 2])),
             ("body", chat_chunk("a", [97])), ("body", chat_chunk("", [KANA[0]])), ("body", chat_chunk("", [300])),
             ("lost", "the rank died")]
    rest = [("head", 200, SSE), ("body", completion_chunk("", [KANA[0]])), ("body", completion_chunk("", [300])),
            ("body", completion_chunk("", [KANA[1]])), ("body", completion_chunk("こ", [KANA[2]], "stop")),
            ("body", event("[DONE]")), ("complete",)]
    pool = ScriptedPool({0: [first], 1: [rest]}, decode=decode)
    keep, client, _, _ = life(pool, CHAT, STREAMED)
    assert keep and chat_text(client.body()) == "aこ"
    continued = json.loads(sent_to(pool, 1, b"POST /v1/completions ").partition(b"\r\n\r\n")[2])
    assert continued["prompt"] == [1, 2, 97]  # after "a", not after the special token


def test_a_continuation_that_repeats_differently_is_cut_never_shown():
    first = [("head", 200, SSE), ("body", chat_chunk(None, [], prompt_token_ids=[1, 2])),
             ("body", chat_chunk("a", [97])), ("body", chat_chunk("", [KANA[0]])), ("lost", "the rank died")]
    other = [("head", 200, SSE), ("body", completion_chunk("b", [98])), ("body", completion_chunk("!", [33], "stop")),
             ("body", event("[DONE]")), ("complete",)]
    pool = ScriptedPool({0: [first], 1: [other]})
    _, client, made, _ = life(pool, CHAT, STREAMED)
    body = client.body()
    assert chat_text(body) == "a" and b"other tokens than the client read" in body
    assert body.endswith(b"data: [DONE]\n\n")
    assert made.stats.cut_streams == {"0": 1}


def test_a_stream_that_cannot_continue_is_cut_with_an_error_event():
    pool = ScriptedPool({0: [[*FIRST_TOKENS, ("lost", "the rank died")]], 1: [REST]})
    keep, client, made, _ = life(pool, CHAT, STREAMED, options=("--router-retries", "0"))
    body = client.body()
    assert b'"error"' in body and b"rank 0" in body and body.endswith(b"data: [DONE]\n\n") and keep
    assert made.stats.cut_streams == {"0": 1} and len(pool.connections) == 1  # nothing asked of rank 1


def test_a_continuation_refused_by_every_other_rank_is_cut_and_says_so():
    refused = [("head", 400, [*JSON, (b"content-length", b"2")]), ("body", b"{}"), ("complete",)]
    pool = ScriptedPool({0: [[*FIRST_TOKENS, ("lost", "the rank died")]], 1: [refused]})
    _, client, made, _ = life(pool, CHAT, STREAMED)
    assert b"no other rank ready to continue it" in client.body() and made.stats.cut_streams == {"0": 1}


NO_LIMIT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()


def test_the_model_s_generation_defaults_bound_a_continuation_or_refuse_it(tmp_path):
    """A chat without a limit ends where vLLM's default from generation_config.json (max_new_tokens)
    ends it, not at the rest of the context; a default penalty (counted over output only) cannot
    be continued exactly, nor defaults that cannot be read: cut, and said why."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "generation_config.json").write_text('{"max_new_tokens": 12}')
    pool = ScriptedPool({0: [[*FIRST_TOKENS, ("lost", "the rank died")]], 1: [REST]})
    keep, client, _, _ = life(pool, CHAT, NO_LIMIT, options=("--", str(model)))
    continued = json.loads(sent_to(pool, 1, b"POST /v1/completions ").partition(b"\r\n\r\n")[2])
    assert keep and chat_text(client.body()) == "Hello world!" and continued["max_tokens"] == 12 - 2
    (model / "generation_config.json").write_text('{"presence_penalty": 0.4}')
    pool = ScriptedPool({0: [[*FIRST_TOKENS, ("lost", "the rank died")]], 1: [REST]})
    _, client, made, _ = life(pool, CHAT, NO_LIMIT, options=("--", str(model)))
    assert b"generation config sets presence_penalty 0.4" in client.body() and made.stats.cut_streams == {"0": 1}
    # vLLM's cap on every request (--override-generation-config max_new_tokens), an explicit limit too
    (model / "generation_config.json").write_text("{}")
    pool = ScriptedPool({0: [[*FIRST_TOKENS, ("lost", "the rank died")]], 1: [REST]})
    life(pool, CHAT, STREAMED, options=("--", str(model), "--override-generation-config.max_new_tokens", "5"))
    assert json.loads(sent_to(pool, 1, b"POST /v1/completions ").partition(b"\r\n\r\n")[2])["max_tokens"] == 5 - 2
    pool = ScriptedPool({0: [[*FIRST_TOKENS, ("lost", "the rank died")]], 1: [REST]})
    _, client, _, _ = life(pool, CHAT, NO_LIMIT, options=("--", "org/not-downloaded"))
    assert b"generation defaults cannot be read" in client.body() and len(pool.connections) == 1


def test_a_planned_stop_hands_a_stream_off_to_another_rank():
    async def go():
        pool = ScriptedPool({0: [[*FIRST_TOKENS, ("wait",)]], 1: [REST]})
        made, reports = router(pool)
        client = RecordingClient()
        passage = asyncio.ensure_future(Passage(made, client, request(CHAT, STREAMED)).run())  # type: ignore[arg-type]
        while not made.held.get(0) or not next(iter(made.held[0])).sent:
            await asyncio.sleep(0)
        assert made.hand_off([0]) == 1
        return await passage, client, pool, reports
    keep, client, pool, reports = asyncio.run(go())
    assert keep and b" world" in client.body() and pool.connections[0].closed  # the rank saw the disconnect
    assert reports.resumed == [(0, 1, 2)]


def test_a_client_that_goes_away_ends_the_life_and_closes_the_rank_s_connection():
    async def go():
        pool = ScriptedPool({0: [[*FIRST_TOKENS, ("wait",)]]})
        made, _ = router(pool)
        client = RecordingClient()
        passage = asyncio.ensure_future(Passage(made, client, request(CHAT, STREAMED)).run())  # type: ignore[arg-type]
        while client.exchange is None or not client.exchange.sent:
            await asyncio.sleep(0)
        client.exchange.client_gone()
        return await passage, pool
    keep, pool = asyncio.run(go())
    assert keep is False and pool.connections[0].closed


@pytest.mark.parametrize(("outcome", "sent", "resumable", "resendable", "retries_left"),
                         list(itertools.product(Outcome, (False, True), (False, True), (False, True), (False, True))))
def test_the_step_table(outcome, sent, resumable, resendable, retries_left):
    step = next_step(outcome, sent, resumable, resendable, retries_left)
    if outcome is Outcome.CLIENT_GONE:
        assert step is Step.GONE
    elif outcome is Outcome.COMPLETE:
        assert step is Step.COMPLETE
    elif sent:  # a byte went out: never sent again
        assert step is (Step.CONTINUE if resumable else Step.CUT)
    elif retries_left and (outcome is Outcome.UNREACHABLE or resendable):
        assert step is Step.RETRY
    else:
        assert step is Step.FAIL
