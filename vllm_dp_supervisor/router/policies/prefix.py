"""`prefix`: a request goes where its prompt's first --router-prefix-chars characters go
(keyed.py), so requests that share a long system prompt or few-shot examples meet on one rank's
prefix cache. A request without a prompt (or not a POST) is balanced by load. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vllm_dp_supervisor.router.policies.base import Routed
from vllm_dp_supervisor.router.policies.keyed import Keyed
from vllm_dp_supervisor.router.policies.load import Load


class Prefix(Keyed):
    def __init__(self, load: Load, chars: int) -> None:
        super().__init__(load)
        self._chars = chars

    def key(self, request: Routed) -> bytes | None:
        return prompt_prefix(request.json(), self._chars) if request.method == b"POST" else None


def _text(content: Any) -> str:
    """A chat message's content as text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def prompt_prefix(request: Mapping[str, Any] | None, chars: int) -> bytes | None:
    """The first `chars` characters of what the model will read first: a completion's prompt, or
    a chat's messages in order, each as `role` then content, the way chat templates lay them out
    (the template's own markup is the same for every request, so it changes no placement). None
    when the request has neither (it is balanced by load). `request`: its body, parsed."""
    if request is None:
        return None
    messages, prompt = request.get("messages"), request.get("prompt")
    if isinstance(messages, list):
        parts, size = [], 0
        for message in messages:
            if not isinstance(message, dict):
                continue
            piece = f"<{message.get('role')}>{_text(message.get('content'))}"
            parts.append(piece)
            size += len(piece)
            if size >= chars:
                break
        text = "".join(parts)
    elif isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        text = prompt[0]  # a batch: placed by its first prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt[:chars]):
        return b"tokens:" + ",".join(map(str, prompt[:chars // 4])).encode()  # ~4 characters a token
    else:
        return None
    return text[:chars].encode(errors="replace") if text else None
