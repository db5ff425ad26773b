"""A request's prompt as the engine will see it, tokens first: the chat template rendered, then the
model's own tokenizer (tokenizer.json, through the `tokenizers` library), as vLLM 0.32 does for
/v1/chat/completions (no special tokens added: the template has them) and /v1/completions (the
tokenizer's own, e.g. a BOS; a prompt of token ids is taken as is).

Lazily: the router needs a prompt's blocks only as far as some rank holds them, so the text is
tokenized in pieces of about `piece_chars`, cut where the tokenizer's own rules (its
pre-tokenizer splits words at spaces) give the same tokens as the whole would; `PromptReader`
checks this once when it loads, and tokenizes whole when it does not hold. Pieces are kept in a
bounded cache, so a system prompt or a conversation's earlier turns are tokenized once.

A request this module cannot read the way vLLM would (images, a cache salt, a LoRA it does not
know, a template that refuses it) has no tokens here: it is routed by load.
"""

from __future__ import annotations

import array
import collections
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import tokenizers

from vllm_dp_supervisor.kvcache.model_files import ModelFiles
from vllm_dp_supervisor.kvcache.template import ChatTemplate

CHECK_TEXT = ("Hello, world!  It's 2026: 12345 tokens\n\nper-second; don't   stop.\tTabs\r\nand \"quotes\" "
              "(parens) [brackets] {braces} x=1+2*3 naïve café 東京 🙂 end. ") * 3


class PromptError(ValueError):
    """Not a prompt this module reads as vLLM would."""


class PromptReader:
    def __init__(self, files: ModelFiles, piece_chars: int = 1024, cached_pieces: int = 2048) -> None:
        self._tokenizer = tokenizers.Tokenizer.from_file(str(files.tokenizer_json))
        self._templates = {name: ChatTemplate(source, files.special_tokens) for name, source in files.templates.items()}
        self._files = files
        self.piece_chars = piece_chars
        self._pieces: collections.OrderedDict[str, array.array[int]] = collections.OrderedDict()
        self._cached_pieces = cached_pieces
        plain = self._tokenizer.encode("a", add_special_tokens=False).ids
        framed = self._tokenizer.encode("a", add_special_tokens=True).ids
        at = next((i for i in range(len(framed)) if framed[i:i + len(plain)] == plain), 0)
        self._before, self._after = framed[:at], framed[at + len(plain):]  # what add_special_tokens adds
        self.in_pieces = self._whole(CHECK_TEXT) == [t for p in self._cut(CHECK_TEXT, 16) for t in self._whole(p)]

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

    def token_pieces(self, prompt: tuple[str, bool] | list[int]) -> Iterator[tuple[Sequence[int], int]]:
        """The prompt's token ids a piece at a time, each with the characters of text it covers."""
        if isinstance(prompt, list):
            yield prompt, 0
            return
        text, framed = prompt
        if framed and self._before:
            yield self._before, 0
        if self.in_pieces:
            for piece in self._cut(text, self.piece_chars):
                yield self._cached(piece), len(piece)
        else:
            yield self._whole(text), len(text)
        if framed and self._after:
            yield self._after, 0

    def token_ids(self, prompt: tuple[str, bool] | list[int]) -> list[int]:
        return [t for piece, _ in self.token_pieces(prompt) for t in piece]

    def _whole(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def _cached(self, piece: str) -> array.array[int]:
        ids = self._pieces.get(piece)
        if ids is None:
            ids = array.array("l", self._whole(piece))
            self._pieces[piece] = ids
            if len(self._pieces) > self._cached_pieces:
                self._pieces.popitem(last=False)
        else:
            self._pieces.move_to_end(piece)
        return ids

    @staticmethod
    def _cut(text: str, size: int) -> Iterator[str]:
        """`text` in pieces of about `size` characters, each cut before a single space that follows
        a word and precedes one: a byte-level pre-tokenizer splits there, whatever the model."""
        start = 0
        while len(text) - start > size:
            cut = start + size
            while cut < len(text) - 1 and not (text[cut] == " " and not text[cut - 1].isspace()
                                               and not text[cut + 1].isspace()):
                cut += 1
            if cut >= len(text) - 1:
                break
            yield text[start:cut]
            start = cut
        yield text[start:]


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
