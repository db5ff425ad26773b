"""router/stop.py: stop strings applied as vLLM 0.32's detokenizer applies them. Pure; the
reference below follows vLLM's check_stop_strings one token at a time."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vllm_dp_supervisor.router.stop import StopText

PIECES = st.lists(st.text(alphabet="ab c", min_size=0, max_size=3), max_size=30)
STOPS = st.lists(st.text(alphabet="ab c", min_size=1, max_size=3), max_size=3)


def reference(pieces: list[str], stops: list[str], keep: bool, min_tokens: int) -> tuple[str, str | None]:
    """The final text and the stop string, one token at a time as vLLM does it."""
    text = ""
    for k, piece in enumerate(pieces, 1):
        before, text = text, text + piece
        if not piece or not stops or k <= min_tokens:
            continue
        best = None
        for stop in stops:
            at = text.find(stop, max(0, len(before) + 1 - len(stop)))
            if at >= 0 and (best is None or at + len(stop) < best[0]):
                best = (at + len(stop), stop, at)
        if best is not None:
            return text[:best[0] if keep else best[2]], best[1]
    return text, None


@given(PIECES, STOPS, st.booleans(), st.integers(0, 5))
def test_the_text_that_goes_out_is_vllms_whatever_the_stops(pieces, stops, keep, min_tokens):
    text = StopText(tuple(stops), keep, min_tokens)
    out, stopped = "", None
    for piece in pieces:
        sent, stopped = text.add(piece, 1)
        out += sent
        if stopped is not None:
            break
        # while it runs, the last characters that could begin a stop string are held back
        assert len(out) <= max(0, len(text.text) - text.hold)
    if stopped is None:
        out += text.finish()
    assert (out, stopped) == reference(pieces, stops, keep, min_tokens)


def test_a_stop_string_split_over_tokens_is_held_back_until_it_is_whole_or_not():
    text = StopText(("END",), False, 0)
    assert text.add("The E", 1) == ("The", None)  # the last 2 characters held: "END" is 3 long
    assert text.add("N", 1) == (" ", None)
    assert text.add("D.", 1) == ("", "END")
    assert text.text == "The "
    other = StopText(("END",), False, 0)
    other.add("The E", 1)
    assert other.add("Nd", 1) == (" E", None)
    assert other.finish() == "Nd"


def test_min_tokens_keeps_the_first_stops_from_counting():
    text = StopText(("x",), False, 2)
    assert text.add("x", 1) == ("x", None)
    assert text.add("x", 1) == ("x", None)
    assert text.add("ax", 1) == ("a", "x")
