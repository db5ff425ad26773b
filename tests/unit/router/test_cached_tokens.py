"""router/cached_tokens.py against answers built and serialized by vLLM 0.32's own classes, in
process (a non-streamed chat as its JSONResponse writes it, a stream's chunks as its
model_dump_json writes them), with text that spells the key in the generated content, CJK and
emoji, fed in every split and in random reads."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_dp_supervisor.router.cached_tokens import CachedTokens

protocol = pytest.importorskip("vllm.entrypoints.openai.chat_completion.protocol")  # vLLM's own, from .venv
from fastapi.responses import JSONResponse  # noqa: E402
from vllm.entrypoints.generate.base.protocol import DeltaMessage  # noqa: E402
from vllm.entrypoints.serve.engine.protocol import PromptTokenUsageInfo, UsageInfo  # noqa: E402

TRICKY = 'usage: {"cached_tokens": 7, "prompt_tokens_details": {"cached_tokens":9}} 東京 😀 "cached_tokens"'


def whole_answer(details: PromptTokenUsageInfo | None) -> bytes:
    """A non-streamed chat as vLLM answers it (api_router: JSONResponse(content=model_dump()))."""
    answer = protocol.ChatCompletionResponse(
        model="m", choices=[protocol.ChatCompletionResponseChoice(
            index=0, message=protocol.ChatMessage(role="assistant", content=TRICKY), finish_reason="stop")],
        usage=UsageInfo(prompt_tokens=300, completion_tokens=20, total_tokens=320, prompt_tokens_details=details))
    return bytes(JSONResponse(content=answer.model_dump()).body)


def streamed_answer(details: PromptTokenUsageInfo | None) -> bytes:
    """A stream as vLLM sends it: content chunks (exclude_unset), then the usage chunk
    (exclude_unset, exclude_none), then [DONE]."""
    out = []
    for piece in (TRICKY[:20], TRICKY[20:]):
        chunk = protocol.ChatCompletionStreamResponse(id="c", created=1, model="m", choices=[
            protocol.ChatCompletionResponseStreamChoice(index=0, delta=DeltaMessage(content=piece))])
        out.append(b"data: " + chunk.model_dump_json(exclude_unset=True).encode() + b"\n\n")
    final = protocol.ChatCompletionStreamResponse(id="c", created=1, model="m", choices=[], usage=UsageInfo(
        prompt_tokens=300, completion_tokens=20, total_tokens=320, prompt_tokens_details=details))
    out.append(b"data: " + final.model_dump_json(exclude_unset=True, exclude_none=True).encode() + b"\n\n")
    return b"".join(out) + b"data: [DONE]\n\n"


def read(data: bytes, cuts: list[int]) -> CachedTokens:
    reader = CachedTokens()
    at = 0
    for cut in sorted(cuts):
        reader.feed(data[at:cut])
        at = cut
    reader.feed(data[at:])
    return reader


@pytest.mark.parametrize("answer", [whole_answer, streamed_answer])
def test_the_cached_tokens_are_read_whatever_the_split_and_the_text_never_fools_it(answer):
    data = answer(PromptTokenUsageInfo(cached_tokens=256))
    assert data.count(b'"cached_tokens"') == 1  # the text's spellings are escaped: one key
    for cut in range(len(data) + 1):
        reader = read(data, [cut])
        assert (reader.value, reader.prompt, reader.completion) == (256, 300, 20), cut
    reader = read(data, list(range(len(data))))  # a byte a read
    assert reader.value == 256


@given(st.lists(st.integers(min_value=0, max_value=2000), max_size=40), st.integers(min_value=0, max_value=10**9))
def test_random_reads(cuts, cached):
    data = streamed_answer(PromptTokenUsageInfo(cached_tokens=cached))
    assert read(data, [min(c, len(data)) for c in cuts]).value == cached


@pytest.mark.parametrize("answer", [whole_answer, streamed_answer])
def test_no_details_tells_nothing(answer):
    reader = read(answer(None), [37])
    assert (reader.value, reader.prompt, reader.completion) == (None, 300, 20)


def test_null_cached_tokens_is_not_known():
    # vLLM writes details with cached_tokens None when it counts only multimodal tokens
    data = whole_answer(PromptTokenUsageInfo(cached_tokens=None, multimodal_tokens={"image": 3}))
    assert b'"cached_tokens":null' in data
    reader = read(data, [len(data) - 60])
    assert reader.value is None and reader.prompt == 300
    assert json.loads(data)["usage"]["prompt_tokens_details"]["multimodal_tokens"] == {"image": 3}


def test_the_last_count_of_a_stream_wins():
    """continuous_usage_stats: every chunk counts so far; the final usage chunk has the whole."""
    chunks = [b'data: {"choices":[{"delta":{"content":"a"}}],"usage":{"prompt_tokens":9,"completion_tokens":%d}}\n\n'
              % i for i in range(1, 4)]
    final = b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,' \
            b'"prompt_tokens_details":{"cached_tokens":8}}}\n\n'
    data = b"".join(chunks) + final
    for cut in range(len(data) + 1):
        reader = read(data, [cut])
        assert (reader.value, reader.prompt, reader.completion) == (8, 9, 3), cut
