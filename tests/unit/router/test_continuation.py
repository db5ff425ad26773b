"""router/continuation.py: which requests continue, against the docs' table of what does not
(docs/router.md), and a property over random request shapes: each is refused, or continued
exactly by the stream code (the exactness itself: test_stream.py and test_seam.py)."""

from __future__ import annotations

import json

from harness import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st
from policies_fakes import routed

from vllm_dp_supervisor.router import continuation

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def test_every_field_that_stops_a_continuation_is_in_the_docs_table():
    page = (ROOT / "docs" / "router.md").read_text()
    table = page[page.index("**Not resumed, and why**"):page.index("**Planned stops hand their streams off.**")]
    assert [f for f in (*continuation.EXCLUDES, "n", "best_of") if f"`{f}`" not in table] == []
    for field in continuation.EXCLUDES:  # and each does stop one
        assert continuation.plan(routed(json.dumps({**CHAT, field: [1]}).encode(), b"/v1/chat/completions"),
                                 True) is None, field


SHAPES = st.fixed_dictionaries({}, optional={
    "max_tokens": st.none() | st.integers(0, 50), "max_completion_tokens": st.none() | st.integers(0, 50),
    "temperature": st.none() | st.floats(0, 2), "presence_penalty": st.none() | st.floats(-2, 2),
    "frequency_penalty": st.none() | st.floats(-2, 2), "logprobs": st.none() | st.booleans() | st.integers(0, 5),
    "n": st.none() | st.integers(1, 3), "stop": st.none() | st.text(max_size=3) | st.lists(st.text(max_size=3)),
    "tools": st.none() | st.just([{"type": "function"}]), "echo": st.booleans(),
    "stream_options": st.none() | st.fixed_dictionaries({"include_usage": st.booleans()}),
    "content": st.sampled_from(["text", "parts", "image"])})


@given(SHAPES, st.booleans())
@settings(max_examples=300)
def test_a_request_shape_is_refused_or_planned_with_what_it_asked(shape, chat):
    shape = dict(shape)
    content = shape.pop("content", "text")
    parts = {"text": "hi", "parts": [{"type": "text", "text": "hi"}],
             "image": [{"type": "image_url", "image_url": {"url": "data:,"}}]}[content]
    body = {**({"messages": [{"role": "user", "content": parts}]} if chat else {"prompt": "hi"}), "stream": True,
            **shape}
    plan = continuation.plan(routed(json.dumps(body).encode(), b"/v1/chat/completions" if chat else
                                    b"/v1/completions"), True)
    stop = shape.get("stop")
    refused = (bool(shape.get("presence_penalty")) or bool(shape.get("frequency_penalty"))
               or shape.get("n") not in (None, 1) or bool(shape.get("tools")) or bool(shape.get("echo"))
               or (chat and content == "image")
               or not (shape.get("logprobs") is None or shape.get("logprobs") is False)  # 0: a completion's asks
               or stop == "" or (isinstance(stop, list) and "" in stop))
    assert (plan is None) == bool(refused), (plan, shape)
    if plan is not None:
        limit = shape.get("max_completion_tokens") if chat else None
        limit = shape.get("max_tokens") if limit is None else limit
        assert plan.max_tokens == (limit if chat else 16 if limit is None else limit)
        assert plan.stops == ((stop,) if isinstance(stop, str) else tuple(stop or ()))
