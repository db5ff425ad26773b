"""router/seam.py with stream.py, against vLLM 0.32's own detokenizers (fast and slow), in process:
a greedy answer in CJK, emoji, accented Latin and code is cut after every token, continued from
the point the seam picks (the way the passage picks it: the last chunk end whose tokens decode
whole), and the client must read exactly the uninterrupted answer, never a byte of the prompt.

The rank is vLLM's IncrementalDetokenizer fed the answer's ids one token a chunk (its own deltas,
held-back bytes and all), primed with the prompt's ids as vLLM primes it; the continuation's rank
is a new one primed with the prompt and the tokens up to the point. The tokenizer is a byte-level
BPE trained here on the same text, so characters span 2-4 tokens and some tokens span characters.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from policies_fakes import routed

from vllm_dp_supervisor.router import continuation
from vllm_dp_supervisor.router.stream import NotTheSame, Stream

detokenizer = pytest.importorskip("vllm.v1.engine.detokenizer")  # vLLM's own, from .venv
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402

ANSWERS = ["こんにちは! 😀 東京へ行きます。", "Ça va? Naïve café, über straße. ñandú",
           "def f(x):\n    return x ** 2  # ✓",
           "🙂🙃 👩‍💻 emoji, 中文和日本語が混ざる。", "plain ASCII text, nothing else here."]
PROMPT = "SECRET-SYSTEM-PROMPT: never show this. User: say something."


def train() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|end|>"])
    tok.train_from_iterator([*ANSWERS, PROMPT] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train()


def rank(tokenizer, prompt: list[int], answer: list[int], fast: bool, chat: bool) -> list[bytes]:
    """A rank's SSE events for `answer` after `prompt`, its text from vLLM's own detokenizer."""
    request = SimpleNamespace(request_id="r", prompt_token_ids=prompt, prompt_embeds=None,
                              sampling_params=SamplingParams(max_tokens=len(answer)))
    cls = detokenizer.FastIncrementalDetokenizer if fast else detokenizer.SlowIncrementalDetokenizer
    det = cls(tokenizer, request)
    head = {"id": "x", "created": 1, "model": "m", "object": "chat.completion.chunk" if chat else "text_completion"}
    events = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}], "prompt_token_ids": prompt}] if chat else []
    for i, token in enumerate(answer):
        det.update([token], False)
        last = i == len(answer) - 1
        text = det.get_next_output_text(last, True)
        choice = {"index": 0, "token_ids": [token], "finish_reason": "length" if last else None,
                  **({"delta": {"content": text}} if chat else {"text": text})}
        if not chat and i == 0:
            choice["prompt_token_ids"] = prompt
        events.append({**head, "choices": [choice]})
    return [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


def text_of(out: bytes) -> str:
    chunks = [json.loads(line[6:]) for line in out.split(b"\n\n") if line.startswith(b"data: {")]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


def whole_point(stream: Stream, decode) -> tuple[int, int]:
    """As the passage picks it (passage._whole_point, with the rank's /detokenize)."""
    for point in stream.seam.points(16):
        if point[0] == 0 or not decode(stream.generated[:point[0]]).endswith("\ufffd"):
            return point
    raise AssertionError("no whole point")


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "slow"])
@pytest.mark.parametrize("answer", ANSWERS)
def test_a_stream_cut_after_any_token_reads_as_the_uninterrupted_answer(tokenizer, answer, fast):
    prompt = tokenizer.encode(PROMPT)
    ids = tokenizer.encode(answer)
    assert len(ids) < len(answer.encode())  # merges: some characters are one token, some tokens span two
    request = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True, "max_tokens": len(ids)}
    plan = continuation.plan(routed(json.dumps(request).encode(), b"/v1/chat/completions"), True)
    assert plan is not None
    uninterrupted = text_of(b"".join(rank(tokenizer, prompt, ids, fast, chat=True)))
    assert uninterrupted == answer
    first = rank(tokenizer, prompt, ids, fast, chat=True)
    decode = tokenizer.decode
    for cut in range(1, len(ids)):
        stream = Stream(plan)
        out = b"".join(stream.feed(event) for event in first[:cut + 1])  # the role chunk, then `cut` tokens
        tokens, chars = whole_point(stream, decode)
        body = json.loads(continuation.body(plan, prompt, stream.generated[:tokens]) or b"{}")
        assert body["prompt"] == [*prompt, *ids[:tokens]] and body["max_tokens"] == len(ids) - tokens
        stream.seam.resume_at((tokens, chars), stream.generated)
        stream.restart()
        for event in rank(tokenizer, body["prompt"], ids[tokens:], fast, chat=False):
            out += stream.feed(event, continuation=True)
        got = text_of(out)
        assert got == answer, (cut, tokens, got)
        assert "SECRET" not in got and stream.generated == ids


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "slow"])
def test_a_continuation_from_inside_a_character_is_what_the_seam_prevents(tokenizer, fast):
    """The old continuation, asked from the last token received: vLLM primed with a prompt that
    ends inside a character emits the prompt's own text (fast) or drops the character (slow)."""
    prompt, ids = tokenizer.encode(PROMPT), tokenizer.encode(ANSWERS[0])
    inside = [i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd")]
    assert inside  # the corpus does cut characters
    for at in inside:
        events = rank(tokenizer, [*prompt, *ids[:at]], ids[at:], fast, chat=False)
        rest = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events if e.startswith(b"data: {"))
        whole = tokenizer.decode(ids[:at]).rstrip("\ufffd")
        assert whole + rest != ANSWERS[0]
        assert ("SECRET" in rest) is fast


def test_a_continuation_that_generates_something_else_past_the_point_is_refused(tokenizer):
    prompt, ids = tokenizer.encode(PROMPT), tokenizer.encode(ANSWERS[1])
    request = {"model": "m", "prompt": "x", "stream": True, "max_tokens": len(ids)}
    plan = continuation.plan(routed(json.dumps(request).encode()), True)
    assert plan is not None
    first = rank(tokenizer, prompt, ids, True, chat=False)
    stream = Stream(plan)
    for event in first[:6]:
        stream.feed(event)
    stream.seam.resume_at((2, len(tokenizer.decode(ids[:2]))), stream.generated)  # it read past token 2
    stream.restart()
    other = rank(tokenizer, [*prompt, *ids[:2]], [ids[5], *ids[3:]], True, chat=False)
    with pytest.raises(NotTheSame):
        for event in other:
            stream.feed(event, continuation=True)
    assert stream.diverged is not None
