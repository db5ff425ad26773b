"""`session`: a request goes where its session goes (keyed.py): the --router-session-header, else
the body's `user`, so a conversation's turns meet its earlier turns' cache. A request without a
session is balanced by load. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vllm_dp_supervisor.router.policies.base import Routed
from vllm_dp_supervisor.router.policies.keyed import Keyed
from vllm_dp_supervisor.router.policies.load import Load


class Session(Keyed):
    def __init__(self, load: Load, header: str) -> None:
        super().__init__(load)
        self._header = header.lower().encode()

    def key(self, request: Routed) -> bytes | None:
        # The body is parsed only when it may name a user (most requests carry the header or none).
        return session_key(request.headers, self._header, request.json() if b'"user"' in request.body else None)


def session_key(headers: Sequence[tuple[bytes, bytes]], header: bytes,
                request: Mapping[str, Any] | None) -> bytes | None:
    """The session a request belongs to: the `header` (lower case), else the `user` of its body
    (`request`, parsed)."""
    for name, value in headers:
        if name.lower() == header and value.strip():
            return b"h:" + value.strip()
    if request is None:
        return None
    user = request.get("user")
    return b"u:" + user.encode(errors="replace") if isinstance(user, str) and user else None
