"""A chat template rendered as transformers renders it for vLLM (`apply_chat_template`, text
out): a sandboxed jinja2 environment with trim_blocks and lstrip_blocks, loop controls, the
`generation` tag, a `tojson` that keeps non-ASCII characters, `raise_exception` and
`strftime_now`; the tokenizer's special tokens, the messages, tools, documents and the request's
chat_template_kwargs as variables. A template that raises renders nothing: the request is then
routed by load, and vLLM answers it (with its own error, if it is one).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (transformers marks the assistant's
    tokens with it; the text is the same)."""
    tags = {"generation"}  # noqa: RUF012 - jinja2 declares it so

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def environment() -> jinja2.Environment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    def __init__(self, source: str, special_tokens: Mapping[str, Any]) -> None:
        self.source = source
        self._template = environment().from_string(source)
        self._special = dict(special_tokens)

    def render(self, messages: list[Any], tools: list[Any] | None, documents: list[Any] | None,
               add_generation_prompt: bool, kwargs: Mapping[str, Any]) -> str:
        """The prompt's text; jinja2.TemplateError (or another exception of the template's) if it
        refuses."""
        return self._template.render(**{**self._special, **kwargs, "messages": messages, "tools": tools,
                                        "documents": documents, "add_generation_prompt": add_generation_prompt})
