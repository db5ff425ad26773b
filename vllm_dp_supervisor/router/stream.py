"""One resumable stream on its way to the client (continuation.py decided it is one): its SSE events
read as they pass, what the router keeps of them (the prompt's token ids, the tokens and text
generated so far, how it ended), and the events the client gets, from the first rank or from a
continuation, always in the original request's format. Pure: bytes in, bytes out.

What the client gets is what an uninterrupted answer would have sent it, but for the chunks'
boundaries: the same `id`, `created`, `model` and `object` throughout, its token ids only if it
asked for them, one usage block (with `stream_options.include_usage`) counting its own prompt and
the whole generation, then `data: [DONE]`.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from vllm_dp_supervisor.router.continuation import Plan
from vllm_dp_supervisor.router.seam import Diverged, Seam
from vllm_dp_supervisor.router.stop import StopText

DONE = b"data: [DONE]\n\n"
# vLLM's finish reasons for a request stopped under it, not finished: "abort" (its server aborts
# what runs when its engine dies and it shuts down) and "error". Seen: a chunk with "abort", then
# [DONE], after an EngineCore's SIGKILL. The answer is not whole: it continues elsewhere.
CUT_FINISHES = frozenset({"abort", "error"})
MAX_EVENT = 16 << 20  # an event this long without its end is not an SSE stream the router can read


_decode = msgspec.json.Decoder().decode
_ID_LISTS = (b'"prompt_token_ids":[', b'"token_ids":[')


def without_ids(event: bytes) -> bytes | None:
    """A chunk the rank sent with token ids (the router asked for them) as vLLM sends it to a
    client that did not: each id list written null (vLLM sets the fields, to None). None when the
    ids are not written as vLLM writes them (compact): the chunk is then re-encoded. Exact because
    a key between bare quotes is never inside a JSON string (quotes there are escaped), and a list
    of integers ends at its first `]`."""
    written = event.count(b'token_ids":') - event.count(b'token_ids":null')  # id lists, however written
    for key in _ID_LISTS:
        at = event.find(key)
        if at >= 0:
            end = event.find(b"]", at)
            if end < 0:
                return None
            event = event[:at] + key[:-1] + b"null" + event[end + 1:]
            written -= 1
    return event if written == 0 else None


class StreamEnded(Exception):
    """The rank's stream cannot go on. `before`: what its events before this one gave the client
    (they were read, and counted in the tokens generated): it must still go out."""
    before = b""


class Unreadable(StreamEnded):
    """The rank's stream is not SSE the router can follow: it is passed on no further."""


class NotTheSame(StreamEnded):
    """A continuation differs from what the client read (continuation.Diverged): cut, not continued."""


class RankFailed(StreamEnded):
    """The rank ended the stream with an error event (vLLM sends one when its engine dies under
    it): the answer is not whole, and continues elsewhere like a stream cut by a death."""


class Stream:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.prompt_ids: list[int] | None = None
        self.generated: list[int] = []
        self.text = StopText(plan.stops, plan.keep_stop, plan.min_tokens)
        self.head: dict[str, Any] = {}  # id, created, model, object of the first rank's answer
        self.finish: str | None = None  # the answer's finish_reason, once known
        self.usage_sent = False
        self.done = False  # [DONE] went out
        self.own_stop = False  # the router's stop string ended it: the rank is not waited for
        self.stopped_under_it: str | None = None  # a CUT_FINISHES reason the rank gave
        self.seam = Seam()  # where a continuation may start, what it must repeat
        self.diverged: str | None = None  # a continuation was not the same answer: no more of them
        self._buffer = b""

    @property
    def resumable(self) -> bool:
        """A continuation can pick it up: the prompt's ids are known and the answer runs."""
        return self.prompt_ids is not None and self.finish is None

    # ---- reading ----

    def feed(self, data: bytes, continuation: bool = False) -> bytes:
        """Bytes from a rank (the first one, or a continuation's) → the bytes the client gets.
        Raises StreamEnded (Unreadable, RankFailed) when the stream cannot go on."""
        self._buffer += data
        out = []
        try:
            while (end := self._buffer.find(b"\n\n")) >= 0:
                event, self._buffer = self._buffer[:end], self._buffer[end + 2:]
                out.append(self._event(event, continuation))
            if len(self._buffer) > MAX_EVENT:
                raise Unreadable("an SSE event over 16 MiB")
        except StreamEnded as ended:
            ended.before = b"".join(out)
            raise
        return b"".join(out)

    def restart(self) -> None:
        """A new rank's stream begins: a torn event of the last one is dropped."""
        self._buffer = b""
        self.stopped_under_it = None

    def _event(self, event: bytes, continuation: bool) -> bytes:
        if self.done:
            return b""
        if event.startswith(b"data:") and b"\n" not in event:  # vLLM's: one data line an event
            data = event[5:].strip()
        else:
            lines = [line for line in event.split(b"\n") if line.startswith(b"data:")]
            if not lines:
                return b"" if continuation else event + b"\n\n"  # a comment or a keep-alive, passed on
            data = b"".join(line[5:].strip() for line in lines)
        if data == b"[DONE]":
            return self._done()
        try:
            chunk = _decode(data)  # msgspec: a third of json.loads' time on a chunk
        except (msgspec.DecodeError, ValueError):
            raise Unreadable("an SSE event that is not JSON") from None
        if not isinstance(chunk, dict):
            raise Unreadable("an SSE event that is not a JSON object")
        if "error" in chunk:  # before the head is kept: an error event's is no answer's
            error = chunk["error"]
            raise RankFailed(str(error.get("message") if isinstance(error, dict) else error)[:200])
        if not continuation:
            for key in ("id", "created", "model", "object"):
                self.head.setdefault(key, chunk.get(key))
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            raise Unreadable("a chunk without choices")
        if not choices:
            return self._usage(chunk, continuation)
        return self._choice(chunk, choices[0], continuation, event + b"\n\n")

    def _done(self) -> bytes:
        """The rank's [DONE]: the end, if the answer had finished."""
        if self.stopped_under_it is not None:
            raise RankFailed(f"the rank ended the answer with finish_reason {self.stopped_under_it!r}")
        if self.finish is None:  # vLLM ends every whole answer with a finish reason
            raise RankFailed("the rank ended the answer without a finish reason")
        return self.end()

    def _choice(self, chunk: dict[str, Any], choice: Any, continuation: bool, raw: bytes) -> bytes:
        if not isinstance(choice, dict):
            raise Unreadable("a choice that is not an object")
        if not continuation and self.prompt_ids is None:
            self._prompt_ids(chunk, choice)
        tokens = [int(t) for t in choice.get("token_ids") or ()]
        as_chat = self.plan.chat and not continuation  # a continuation answers as a completion
        delta = choice.get("delta") if as_chat else None
        raw_piece = (delta.get("content") if isinstance(delta, dict) else None) if as_chat else choice.get("text")
        has_text, piece = isinstance(raw_piece, str), raw_piece if isinstance(raw_piece, str) else ""
        finish, stop_reason = choice.get("finish_reason"), choice.get("stop_reason")
        if finish in CUT_FINISHES:  # not an end the client should see: its tokens go out, the rest resumes
            self.stopped_under_it, finish, stop_reason = finish, None, None
        if continuation and self.seam.replaying:  # what the client read already goes out once
            tokens, piece = self._replayed(tokens, piece, finish is not None)
            if not tokens and not piece and finish is None:
                return b""
        self.generated.extend(tokens)
        self.seam.read(len(self.generated), piece)
        text, own_stop = self._stopped(has_text, piece, len(tokens), finish is not None)
        if own_stop is not None:
            finish, stop_reason = "stop", own_stop
        if finish is not None:
            self.finish = finish
        passed = None
        if not continuation and not self.text.stops and self.stopped_under_it is None:
            # nothing to change but the token ids the router asked for: the rank's bytes, with the ids
            # written as vLLM writes them to a client that did not ask (null), or as they are
            passed = raw if self.plan.wants_ids else without_ids(raw)
        out = passed if passed is not None else self._edited(chunk, choice, text, tokens, finish, stop_reason,
                                                             continuation)
        if own_stop is not None:
            self.own_stop = True
            out += self.end()
        return out

    def _stopped(self, has_text: bool, piece: str, tokens: int, finished: bool) -> tuple[str, str | None]:
        """The text that may go out of this piece, and the stop string the router found in it."""
        text, own_stop = piece, None
        if has_text and self.text.stops and (piece or tokens):
            text, own_stop = self.text.add(piece, tokens)
        elif has_text:
            self.text.add(piece, tokens)
        if own_stop is None and finished and self.text.stops:
            text += self.text.finish()  # ended by itself: what the stop strings held back goes too
        return text, own_stop

    def _prompt_ids(self, chunk: dict[str, Any], choice: dict[str, Any]) -> None:
        """vLLM tells the prompt's ids in a chat's first chunk, in a completion's first choice."""
        ids = chunk.get("prompt_token_ids") if self.plan.chat else choice.get("prompt_token_ids")
        if isinstance(ids, list):
            self.prompt_ids = [int(t) for t in ids]

    def _replayed(self, tokens: list[int], piece: str, finished: bool) -> tuple[list[int], str]:
        try:
            return self.seam.replayed(tokens, piece, finished)
        except Diverged as diverged:
            self.diverged = str(diverged)
            raise NotTheSame(str(diverged)) from None

    def _usage(self, chunk: dict[str, Any], continuation: bool) -> bytes:
        if not self.plan.usage or self.usage_sent:
            return b""
        self.usage_sent = True
        # the rank's chunk, its other fields kept: vLLM moves system_fingerprint there under include_usage
        counts = self._counts(chunk.get("usage"), continuation)
        return self._encode({**chunk, **self.head, "choices": [], "usage": counts})

    def _counts(self, usage: Any, continuation: bool = False) -> dict[str, Any]:
        """A usage block for the client: its prompt, the whole generation. A continuation's
        prompt details (cached tokens) are of its own prompt, not the client's: not passed on."""
        prompt = len(self.prompt_ids or ())
        counts = dict(usage) if isinstance(usage, dict) else {}
        if continuation:
            counts.pop("prompt_tokens_details", None)
        counts.update(prompt_tokens=prompt, completion_tokens=len(self.generated),
                      total_tokens=prompt + len(self.generated))
        return counts

    # ---- writing ----

    def _edited(self, chunk: dict[str, Any], choice: dict[str, Any], text: str, tokens: list[int],
                finish: str | None, stop_reason: Any, continuation: bool) -> bytes:
        """The chunk as the client gets it: the rank's own, with the original answer's id,
        created, model and object, the text that may go out, the token ids only if asked for, a
        completion's choice as a chat's delta where the original is a chat; other fields kept."""
        plan = self.plan
        out = {k: v for k, v in chunk.items() if k not in ("choices", "prompt_token_ids", "usage")}
        out.update(self.head)
        edited = {k: v for k, v in choice.items() if k not in ("text", "delta", "token_ids", "prompt_token_ids",
                                                               "finish_reason", "stop_reason")}
        if plan.chat:
            delta = {} if continuation else dict(choice.get("delta") or {})
            if text or "content" in delta or continuation:
                delta["content"] = text
            edited["delta"] = delta
        else:
            edited["text"] = text
        edited["finish_reason"] = finish
        if finish is not None:
            edited["stop_reason"] = stop_reason
        if plan.wants_ids:
            edited["token_ids"] = tokens
            if not continuation and not plan.chat and "prompt_token_ids" in choice:
                edited["prompt_token_ids"] = choice["prompt_token_ids"]
            if not continuation and plan.chat and "prompt_token_ids" in chunk:
                out["prompt_token_ids"] = chunk["prompt_token_ids"]
        else:  # as vLLM writes them to a client that did not ask: the fields set, to null
            edited.update({} if plan.chat else {"prompt_token_ids": None}, token_ids=None)
            if not continuation and plan.chat and "prompt_token_ids" in chunk:
                out["prompt_token_ids"] = None
        out["choices"] = [edited]
        if isinstance(chunk.get("usage"), dict):  # stream_options.continuous_usage_stats
            out["usage"] = self._counts(chunk["usage"], continuation)
        return self._encode(out)

    def _encode(self, chunk: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"

    def end(self) -> bytes:
        """What ends the client's stream once the answer is whole: its usage block (if asked for
        and not sent yet) and [DONE]."""
        if self.done:
            return b""
        out = b""
        if self.plan.usage and not self.usage_sent:
            self.usage_sent = True
            out = self._encode({**self.head, "choices": [], "usage": self._counts(None)})
        self.done = True
        return out + DONE
