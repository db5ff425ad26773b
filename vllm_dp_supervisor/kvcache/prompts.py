"""A request's prompt as the engine will see it, tokens first: the chat template rendered, then the
model's own tokenizer (tokenizer.json, through the `tokenizers` library), as vLLM 0.32 does for
/v1/chat/completions (no special tokens added: the template has them) and /v1/completions (the
tokenizer's own, e.g. a BOS; a prompt of token ids is taken as is).

Lazily: the router needs a prompt's blocks only as far as some rank holds them, so the text is
tokenized in pieces of about `piece_chars`, cut where the tokenizer's own rules give the same
tokens as the whole would: before a single space between words (a byte-level pre-tokenizer splits
words there), and, for text without spaces (Chinese, Japanese, minified JSON), between a letter
and the punctuation or symbol after it (the GPT-2, Llama 3 and Qwen pre-tokenizers never join a
letter run with what follows it). `PromptReader` checks each rule once when it loads, on text
that has both, and does without a rule that does not hold (a SentencePiece model's cuts differ).
A piece never grows past LONGEST_PIECE pieces' worth: text with no place to cut within it is
not read further (the blocks after it are credited to no rank: never more than an engine
holds), so a prompt without spaces or marks costs at most that much tokenizing, not its whole
length (tokenizing runs on the worker's event loop and holds the GIL: a thread would not help).
Pieces are kept in a cache bounded in bytes (CACHE_BYTES), so a system prompt or a
conversation's earlier turns are tokenized once.

A request this module cannot read the way vLLM would (images, a cache salt, a LoRA it does not
know, a template that refuses it) has no tokens here: it is routed by load.
"""

from __future__ import annotations

import array
import collections
import itertools
import json
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import tokenizers

from vllm_dp_supervisor.kvcache.model_files import ModelFiles
from vllm_dp_supervisor.kvcache.template import ChatTemplate

LONGEST_PIECE = 4  # x piece_chars: past it without a place to cut, the rest of the text is not read
CACHE_BYTES = 64 << 20  # the kept pieces: their text (4 bytes a character at most) and token ids
CHECK_MARKS = ("東京は日本の首都です。人口が多い！{\"key\":\"value\",\"list\":[1,2,3],\"naïve\":\"café\"}"
               "終わり、次へ…「引用」😀絵文字です。e\u0301l\u00e8ve;x=y cats. dogs, x™ aⒶ a© №5 ㎏") * 3
APOSTROPHES = "'’ʼ"  # never cut before one: some pre-tokenizers keep a contraction with its word (o200k)
CHECK_TEXT = ("Hello, world!  It's 2026: 12345 tokens\n\nper-second; don't   stop.\tTabs\r\nand \"quotes\" "
              "(parens) [brackets] {braces} x=1+2*3 naïve café 東京 🙂 end. ") * 3


class PromptError(ValueError):
    """Not a prompt this module reads as vLLM would."""


class PromptReader:
    def __init__(self, files: ModelFiles, piece_chars: int = 1024, cache_bytes: int = CACHE_BYTES) -> None:
        self._tokenizer = tokenizers.Tokenizer.from_file(str(files.tokenizer_json))
        self._templates = {name: ChatTemplate(source, files.special_tokens) for name, source in files.templates.items()}
        self._files = files
        self.piece_chars = piece_chars
        self._pieces: collections.OrderedDict[str, array.array[int]] = collections.OrderedDict()
        self._cache_bytes, self.cached_bytes = cache_bytes, 0
        plain = self._tokenizer.encode("a", add_special_tokens=False).ids
        framed = self._tokenizer.encode("a", add_special_tokens=True).ids
        at = next((i for i in range(len(framed)) if framed[i:i + len(plain)] == plain), 0)
        self._before, self._after = framed[:at], framed[at + len(plain):]  # what add_special_tokens adds
        # Never cut inside one of these: the tokenizer matches them whole, before its pre-tokenizer.
        self._added = sorted({t.content for t in self._tokenizer.get_added_tokens_decoder().values()
                              if len(t.content) > 1}, key=len)
        self.at_marks = False  # whether to cut between a letter and a mark: checked after the spaces
        self.in_pieces = self._same_in_pieces(" ".join(self._added) + " " + CHECK_TEXT)
        self.at_marks = True
        self.at_marks = self.in_pieces and _splits_at_marks(self._tokenizer) and \
            self._same_in_pieces("".join(self._added) + CHECK_MARKS, marks_only=True)

    # ---- text ----

    def text(self, path: str, request: Mapping[str, Any]) -> tuple[str, bool] | list[int]:
        """The prompt's text and whether the tokenizer's special tokens frame it, or its token
        ids when the request gives them. PromptError if it is not read here."""
        if request.get("cache_salt") or request.get("prompt_embeds") is not None:
            raise PromptError("a cache salt or prompt embeddings")
        if path == "/v1/chat/completions":
            return self._chat_text(request), bool(request.get("add_special_tokens", False))
        prompt = request.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch: placed by its first prompt
        if isinstance(prompt, str):
            return prompt, bool(request.get("add_special_tokens", True))
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        raise PromptError("no prompt")

    def _chat_text(self, request: Mapping[str, Any]) -> str:
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise PromptError("no messages")
        tools = request.get("tools")
        source = request.get("chat_template")
        template = ChatTemplate(source, self._files.special_tokens) if isinstance(source, str) else \
            self._templates.get("tool_use" if tools and "tool_use" in self._templates else "default")
        if template is None:
            raise PromptError("the model has no chat template")
        kwargs = request.get("chat_template_kwargs")
        converted = [_message(m, "developer" in template.source) for m in messages]
        continue_final = bool(request.get("continue_final_message", False))
        try:
            text = template.render(converted, tools if isinstance(tools, list) else None,
                                   request.get("documents") if isinstance(request.get("documents"), list) else None,
                                   bool(request.get("add_generation_prompt", not continue_final)),
                                   kwargs if isinstance(kwargs, dict) else {})
        except Exception as exc:  # a template raises what it likes; vLLM answers the request itself
            raise PromptError(f"the chat template refused it: {exc}") from None
        final = converted[-1].get("content")
        if continue_final and isinstance(final, str) and final and final in text:
            text = text[:text.rindex(final) + len(final)]
        return text

    # ---- tokens ----

    def token_pieces(self, prompt: tuple[str, bool] | list[int], *,
                     bounded: bool = True) -> Iterator[tuple[Sequence[int], int]]:
        """The prompt's token ids a piece at a time, each with the characters of text it covers.
        `bounded`: text with no place to cut within LONGEST_PIECE pieces' worth ends the reading
        there (the characters covered say how far it got); unbounded, it is tokenized whole."""
        if isinstance(prompt, list):
            yield prompt, 0
            return
        text, framed = prompt
        if framed and self._before:
            yield self._before, 0
        if self.in_pieces:
            covered = 0
            for piece in self._cut(text, self.piece_chars, LONGEST_PIECE if bounded else None):
                covered += len(piece)
                yield self._cached(piece), len(piece)
            if covered < len(text):
                return  # the rest could not be cut: not read, nor the special tokens after it
        else:
            yield self._whole(text), len(text)
        if framed and self._after:
            yield self._after, 0

    def token_ids(self, prompt: tuple[str, bool] | list[int]) -> list[int]:
        """Every token id of the prompt, exactly as the engine's."""
        return [t for piece, _ in self.token_pieces(prompt, bounded=False) for t in piece]

    def _whole(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def _cached(self, piece: str) -> array.array[int]:
        ids = self._pieces.get(piece)
        if ids is None:
            ids = array.array("l", self._whole(piece))
            self._pieces[piece] = ids
            self.cached_bytes += _size(piece, ids)
            while self.cached_bytes > self._cache_bytes and len(self._pieces) > 1:
                self.cached_bytes -= _size(*self._pieces.popitem(last=False))
        else:
            self._pieces.move_to_end(piece)
        return ids

    def _same_in_pieces(self, text: str, marks_only: bool = False) -> bool:
        """Whether `text` cut wherever this reader cuts (only before marks: `marks_only`) gives the
        tokens the whole does."""
        pieces = [text[a:b] for a, b in itertools.pairwise([0, *self._cuts(text, marks_only), len(text)])]
        return self._whole(text) == [t for p in pieces for t in self._whole(p)]

    def _cuts(self, text: str, marks_only: bool = False) -> Iterator[int]:
        for i in range(1, len(text) - 1):
            if self._cuttable(text, i) and (not marks_only or text[i] != " "):
                yield i

    def _cuttable(self, text: str, i: int) -> bool:
        """A cut before text[i] (0 < i < len - 1) gives the same tokens as the whole: a single space
        after a word and before one, or (checked for this tokenizer) a punctuation mark or symbol
        after a letter."""
        c = text[i]
        if c == " ":
            ok = not text[i - 1].isspace() and not text[i + 1].isspace()
        else:
            ok = self.at_marks and text[i - 1].isalpha() and c not in APOSTROPHES \
                and unicodedata.category(c)[0] in "PS"
        return ok and not self._near_added(text, i)

    def _near_added(self, text: str, i: int) -> bool:
        """Whether one of the tokenizer's added tokens spans a cut before text[i], or ends or starts
        one character from it (an added token may strip the space beside it)."""
        for token in self._added:
            j = text.find(token, max(0, i - len(token) - 1), i + len(token) + 1)
            while j != -1:
                if j <= i + 1 and j + len(token) >= i - 1:
                    return True
                j = text.find(token, j + 1, i + len(token) + 1)
        return False

    def _cut(self, text: str, size: int, longest: int | None = None) -> Iterator[str]:
        """`text` in pieces of about `size` characters, each cut where `_cuttable` says. With
        `longest`, a rest that cannot be cut within `longest` x size characters is not given."""
        start = 0
        while len(text) - start > size:
            cut, most = start + size, len(text) - 1 if longest is None else min(len(text) - 1, start + longest * size)
            while cut < most and not self._cuttable(text, cut):
                cut += 1
            if cut >= most:
                if longest is None or len(text) - start <= longest * size:
                    break
                return  # nowhere to cut within `longest` pieces: the rest is not read
            yield text[start:cut]
            start = cut
        yield text[start:]


def _splits_at_marks(tokenizer: tokenizers.Tokenizer) -> bool:
    """Whether the tokenizer's pre-tokenizer is a regex split (GPT-2's byte level, Llama 3's and
    Qwen's Split) over a BPE model, and its normalizer leaves marks marks (none, or NFC): the
    tokenizers for which a letter followed by a mark is always a split (NFKC makes ™ letters;
    a SentencePiece model merges across it; WordPiece splits differently)."""
    spec = json.loads(tokenizer.to_str())
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        return False
    if (spec.get("model") or {}).get("type") != "BPE":
        return False
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return any(step.get("type") == "Split" or (step.get("type") == "ByteLevel" and step.get("use_regex", True))
               for step in steps)


def _size(piece: str, ids: array.array[int]) -> int:
    """The bytes a kept piece may take: its characters at their widest, its ids, and the entries."""
    return 4 * len(piece) + ids.itemsize * len(ids) + 200


def _message(message: Any, developer_known: bool) -> dict[str, Any]:
    """A message as vLLM hands it to the template: text parts joined by newlines (its "string"
    content format); a developer message becomes a system one unless the template knows the role."""
    if not isinstance(message, dict):
        raise PromptError("a message is not an object")
    out = dict(message)
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise PromptError("a message has parts other than text")
        out["content"] = "\n".join(texts)
    if out.get("role") == "developer" and not developer_known:
        out["role"] = "system"
    return out
