"""Stop strings, applied by the router to a resumable stream as vLLM 0.32's detokenizer applies
them (vllm/v1/engine/detokenizer.py), so that one that straddles a rank's death still stops the
answer. Pure.

vLLM's rules, kept here: the stop strings are looked for only once more than `min_tokens` tokens
were generated, in the text those tokens added (a string may begin before it); the one that
completes earliest wins, ties by the list's order; the text ends before it (after it with
include_stop_str_in_output); while the answer runs, the last len(longest stop) - 1 characters are
held back (none with include_stop_str_in_output), and they go out when it ends otherwise.
"""

from __future__ import annotations


class StopText:
    """The generated text of one answer, and what of it may go out."""

    def __init__(self, stops: tuple[str, ...], keep_stop: bool, min_tokens: int) -> None:
        self.stops = stops
        self.keep_stop = keep_stop
        self.min_tokens = min_tokens
        self.hold = max(map(len, stops)) - 1 if stops and not keep_stop else 0
        self.text = ""
        self.sent = 0  # characters of `text` gone out
        self.tokens = 0

    def add(self, piece: str, tokens: int) -> tuple[str, str | None]:
        """`piece`: the text `tokens` new tokens added. What may go out now, and the stop string
        that ended the answer (None: it goes on)."""
        before, before_tokens = len(self.text), self.tokens
        self.text += piece
        self.tokens += tokens
        if self.stops and self.tokens > self.min_tokens:
            # only the text of tokens past min_tokens is new to the search (spread evenly, as a
            # chunk does not say where its tokens' texts begin)
            skipped = max(0, self.min_tokens - before_tokens)
            start = before + (len(piece) * skipped // tokens if tokens else 0)
            found = self._stop_in(start)
            if found is not None:
                stop, end = found
                self.text = self.text[:end]
                return self._out(len(self.text)), stop
        return self._out(max(self.sent, len(self.text) - self.hold)), None

    def finish(self) -> str:
        """The answer ended by itself (its end token, its limit): what was held back."""
        return self._out(len(self.text))

    def _stop_in(self, start: int) -> tuple[str, int] | None:
        """(stop string, where the text ends) for the stop that completes earliest after `start`."""
        best: tuple[int, str, int] | None = None
        for stop in self.stops:
            at = self.text.find(stop, max(0, start + 1 - len(stop)))
            if at < 0:
                continue
            end_of_stop = at + len(stop)
            if best is None or end_of_stop < best[0]:
                best = (end_of_stop, stop, end_of_stop if self.keep_stop else at)
        return None if best is None else (best[1], best[2])

    def _out(self, upto: int) -> str:
        out = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return out
