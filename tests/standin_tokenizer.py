"""A model directory whose tokenizer and chat template give the stand-in's own token ids
(standin_model.py: a text's UTF-8 bytes; the end of a completion's prompt, 256, added after a
text prompt; the assistant marker, 257, after a chat's messages), so the cache policy's router
reads a prompt as the stand-in will, from files, as it reads a real model's.

A byte-level BPE with no merges (each byte its own token, its id the byte's value), the two
markers as special tokens with names no prompt holds, and a jinja2 chat template that writes each
message as `<|role|>content` and a newline, as standin_model.chat_prompt does.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers.pre_tokenizers import ByteLevel

END_OF_PROMPT_TEXT, ASSISTANT_TEXT, END_TEXT = "<|standin-end-of-prompt|>", "<|standin-assistant|>", "<|standin-end|>"
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] or '' }}\n"
                 "{% endfor %}{% if add_generation_prompt %}" + ASSISTANT_TEXT + "{% endif %}")


def build(directory: Path) -> Path:
    """Write tokenizer.json and tokenizer_config.json into `directory`; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = ByteLevel.alphabet()
    byte_chars = {b: c for b, c in _bytes_to_unicode().items() if c in alphabet}
    vocab = {char: byte for byte, char in byte_chars.items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([END_OF_PROMPT_TEXT, ASSISTANT_TEXT, END_TEXT])  # ids 256, 257, 258
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {END_OF_PROMPT_TEXT}", special_tokens=[(END_OF_PROMPT_TEXT, 256)])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHAT_TEMPLATE, "eos_token": END_TEXT, "bos_token": None}))
    return directory


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of bytes to printable characters, which the ByteLevel pre-tokenizer applies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}
