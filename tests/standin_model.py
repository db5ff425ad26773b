"""The stand-in's "model": deterministic, so a test can check that a stream resumed on another rank
reads byte for byte as an uninterrupted one. Standard library only (standin.py imports it).

- Tokens are bytes (0-255: a text's UTF-8, as a byte-level BPE would), plus two special tokens: the
  end of a completion's prompt (added to a text prompt, not to one given as token ids, as vLLM's
  `add_special_tokens` does) and the chat template's assistant marker.
- The next token is a function of every token before it (greedy), or of that and a generator
  seeded by the request's `seed` (sampled): a continuation of a greedy stream from its prompt and
  generated tokens generates what the uninterrupted one would have; a sampled one restarts its
  generator, so it is a valid sample, not the same text (as with vLLM).
- An answer is `answer_length` tokens after the last marker, its end token last (finish_reason
  "stop", no text), so a continuation whose prompt holds the marker and the first tokens ends
  where the original would.
- Text as vLLM's detokenizer sends it: a token's bytes are held back while they end inside a
  character (`use_unicode()` makes the model write kana, CJK, emoji and accented letters, 2-4 byte
  tokens each), and a prompt of ids that ends inside a character makes the first text out the
  prompt's own, as vLLM 0.32's fast detokenizer does (the bug a continuation must not meet).
- max_tokens as vLLM 0.32 reads it: a completion's null is 16; a chat's max_completion_tokens
  unless null, then max_tokens, then the rest of the context (MAX_MODEL_LEN).
- Stop strings, min_tokens and max_tokens as vLLM applies them: a stop string ends the answer
  (without it unless include_stop_str_in_output) once more than min_tokens tokens were generated;
  while streaming, the last len(longest stop) - 1 characters are held back, as vLLM's detokenizer
  holds them.
"""

from __future__ import annotations

import codecs
import hashlib
import random
from collections.abc import Iterator
from typing import Any

END_OF_PROMPT, ASSISTANT, END_OF_ANSWER = 256, 257, 258
ALPHABET = b" abcdefghijklmnopqrstuvwxyz"
# use_unicode(): characters of 1-4 UTF-8 bytes, one byte a token (a byte-level BPE without merges)
UNICODE = [c.encode() for c in " aeこんにちは東京へ😀🙂éñü。"]
CHARACTERS: list[bytes] | None = None
COMPLETIONS_MAX_TOKENS = 16  # vLLM's (OpenAI's) default max_tokens of a completion
MAX_MODEL_LEN = 4096  # /v1/models says it, as vLLM does


def use_unicode() -> None:
    """The model writes multi-byte characters (the stand-in's --standin-unicode)."""
    global CHARACTERS
    CHARACTERS = UNICODE


def tokenize(text: str) -> list[int]:
    return list(text.encode())


def detokenize(ids: list[int]) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def chat_prompt(messages: Any) -> list[int]:
    """A chat template: each message as <|role|>content and a newline, then the assistant marker
    (standin_tokenizer.CHAT_TEMPLATE says the same in jinja2, for the router). A message's text
    parts are joined by newlines, as vLLM joins them."""
    text = ""
    for message in messages if isinstance(messages, list) else []:
        if isinstance(message, dict):
            content = message.get("content")
            if isinstance(content, list):
                content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
            text += f"<|{message.get('role')}|>{content or ''}\n"
    return [*tokenize(text), ASSISTANT]


def completion_prompt(prompt: Any) -> list[int]:
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)  # token ids: no special token added
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt and isinstance(prompt[0], str) else ""
    return [*tokenize(str(prompt or "")), END_OF_PROMPT]


def _answered(sequence: list[int]) -> int:
    """Tokens after the last marker: how far into its answer the sequence is."""
    for i in range(len(sequence) - 1, -1, -1):
        if sequence[i] in (END_OF_PROMPT, ASSISTANT):
            return len(sequence) - i - 1
    return len(sequence)


def _hash(sequence: list[int]) -> int:
    digest = hashlib.blake2b(b"".join(t.to_bytes(2, "little") for t in sequence), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def next_token(sequence: list[int], rng: random.Random | None) -> int:
    h = _hash(sequence)
    if CHARACTERS is not None:
        inside = _inside_character(sequence)
        if inside is not None:  # the next byte of the character begun at `lead`, chosen by what preceded it
            lead, have = inside
            same = [c for c in CHARACTERS if c[0] == sequence[lead]]
            return same[_hash(sequence[:lead]) % len(same)][have]
        return CHARACTERS[(h + (rng.randrange(len(CHARACTERS)) if rng else 0)) % len(CHARACTERS)][0]
    if rng is not None:
        h += rng.randrange(len(ALPHABET))
    return ALPHABET[h % len(ALPHABET)]


def _inside_character(sequence: list[int]) -> tuple[int, int] | None:
    """(where the unfinished character at the end begins, its bytes so far), or None."""
    for back in range(1, 4):
        if len(sequence) < back or not 0 <= sequence[-back] < 256:
            return None
        byte = sequence[-back]
        if byte >= 0xC0:
            length = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return (len(sequence) - back, back) if back < length else None
        if byte < 0x80:
            return None
    return None



def generate(prompt: list[int], request: dict[str, Any], answer_length: int,
             chat: bool) -> Iterator[tuple[int, str, str | None, str | None]]:
    """(token id, text to send now, finish_reason, stop_reason) per token, as vLLM streams them."""
    if chat:
        limit = request.get("max_completion_tokens")
        limit = request.get("max_tokens") if limit is None else limit
        limit = MAX_MODEL_LEN - len(prompt) if limit is None else limit
    else:
        limit = request.get("max_tokens")
        limit = COMPLETIONS_MAX_TOKENS if limit is None else limit
    stops = request.get("stop") or []
    stops = [stops] if isinstance(stops, str) else [s for s in stops if isinstance(s, str) and s]
    keep_stop = bool(request.get("include_stop_str_in_output"))
    hold = 0 if keep_stop or not stops else max(map(len, stops)) - 1
    min_tokens = request.get("min_tokens") or 0  # no end and no stop string before it (vLLM's rule)
    temperature = request.get("temperature")
    rng = None if not temperature else random.Random(request.get("seed"))
    sequence, sent, count = list(prompt), 0, 0
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    said = decoder.decode(bytes(t for t in prompt if t < 256))
    # vLLM's fast detokenizer primed with a prompt that ends inside a character: its first text is
    # the prompt's own, from the start
    text = said if decoder.getstate()[0] else ""
    while True:
        if _answered(sequence) >= answer_length - 1 and count >= min_tokens:
            yield END_OF_ANSWER, text[sent:], "stop", None  # its end token: the rest, held back or not
            return
        token = next_token(sequence, rng)
        sequence.append(token)
        count += 1
        before = len(text)
        text += decoder.decode(bytes([token])) if token < 256 else ""  # held back inside a character
        for stop in stops if count > min_tokens else ():
            at = text.find(stop, max(0, before + 1 - len(stop)))
            if at >= 0:
                end = at + len(stop) if keep_stop else at
                yield token, text[sent:end], "stop", stop
                return
        if limit is not None and count >= limit:
            yield token, text[sent:], "length", None
            return
        ready = max(sent, len(text) - hold)
        yield token, text[sent:ready], None, None
        sent = ready


def events(request: dict[str, Any], chat: bool, answer_length: int, head: dict[str, Any],
           extra: dict[str, Any] | None = None, details: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """The streamed answer's events as vLLM 0.32 sends them (without the `data: ` framing and the
    final [DONE]): a chat's role chunk, one chunk per token (its token id and, first, the prompt's
    under return_token_ids), a usage chunk with stream_options.include_usage. `extra`: fields
    added to every token chunk; `details`: the usage's prompt_tokens_details (vLLM's
    --enable-prompt-tokens-details)."""
    prompt = chat_prompt(request.get("messages")) if chat else completion_prompt(request.get("prompt"))
    with_ids = bool(request.get("return_token_ids"))
    if chat:
        yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}], **({"prompt_token_ids": prompt} if with_ids else {})}
    generated = 0
    for i, (token, text, finish, stop) in enumerate(generate(prompt, request, answer_length, chat)):
        choice: dict[str, Any] = {"index": 0, **({"delta": {"content": text}} if chat else {"text": text}),
                                  "logprobs": None, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = stop
        if with_ids:
            choice["token_ids"] = [token]
            if not chat and i == 0:
                choice["prompt_token_ids"] = prompt
        generated += 1
        yield {**head, "choices": [choice], **(extra or {})}
    if (request.get("stream_options") or {}).get("include_usage"):
        yield {**head, "choices": [], "usage": {"prompt_tokens": len(prompt), "completion_tokens": generated,
                                                "total_tokens": len(prompt) + generated, **(details or {})}}
