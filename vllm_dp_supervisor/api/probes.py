"""The answers to the probe paths (/live, /livez, /ready, /readyz, /health, /ready/<rank>), read
from the published view. Pure: the same answer for the FastAPI routes and for the protocol's fast
path (bounds.py), which writes it in the same turn of the event loop as the request's last byte
(a probe is the hottest and simplest request the supervisor gets, and after a rank's death the
first one to say so).
"""

from __future__ import annotations

import json
from typing import Any

from vllm_dp_supervisor.core.snapshot import PodView

LIVE_PATHS = frozenset({b"/live", b"/livez"})
READY_PATHS = frozenset({b"/ready", b"/readyz", b"/health"})
RANK_PREFIX = b"/ready/"
RANK_DIGITS = 5  # ranks are fewer than 65536 (one port each)


def ascii_number(text: str, digits: int) -> int | None:
    """A non-negative ASCII decimal of at most `digits` digits, else None. Not str.isdigit(),
    which takes "²" and "١", and not int() on unbounded input."""
    text = text.strip()
    if not 0 < len(text) <= digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def rank_index(text: str, ranks: int) -> int | tuple[int, dict[str, Any]]:
    """The rank a path names, or the error to answer (400 malformed, 404 out of range)."""
    index = ascii_number(text, RANK_DIGITS)
    if index is None:
        return 400, {"error": f"rank must be a number from 0 to {ranks - 1}"}
    if index >= ranks:
        return 404, {"error": f"no rank {index}: ranks are 0-{ranks - 1}"}
    return index


def answer(view: PodView, path: bytes) -> tuple[int, dict[str, Any]] | None:
    """(status, JSON body) for a probe path; None for any other path."""
    if path in READY_PATHS:
        if view.ready:  # on a quorum below all, the ranks that are not are named all the same
            missing = view.not_ready()
            return 200, {"ready": True, "not_ready": missing} if missing else {"ready": True}
        return 503, {"ready": False, "stopping": not view.live, "not_ready": view.not_ready()}
    if path in LIVE_PATHS:
        return (200, {"live": True}) if view.live else (503, {"live": False, "stopping": True})
    if path.startswith(RANK_PREFIX) and b"/" not in path[len(RANK_PREFIX):]:
        index = rank_index(path[len(RANK_PREFIX):].decode("latin-1"), len(view.ranks))
        if isinstance(index, tuple):
            return index
        ok = view.rank_ready(index)
        return (200 if ok else 503), {"rank": index, "ready": ok}
    return None


def encoded(status_and_body: tuple[int, dict[str, Any]]) -> tuple[int, bytes]:
    status, body = status_and_body
    return status, json.dumps(body, separators=(",", ":")).encode()
