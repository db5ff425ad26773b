"""What the supervisor and a router worker say to each other: one JSON object per line over a
Unix socket pair.

Supervisor → worker: `{"view": {"v": N, "ready": [[rank, port, attempt], ...]}}` on every change
of the published view and once a second (so a worker that missed one catches up), and
`{"drain": SECONDS}` at the stop. Worker → supervisor: `{"stats": {...}}` twice a second
(stats.py); `{"load": {"v": N, "inflight": {rank: n}, "stalled": [rank, ...]}}` on taking view N
and whenever a request ends on a rank no longer in its view (the supervisor waits on these to
stop a drained rank); `{"unreachable": [rank, attempt, why]}` when it could not connect to a rank
it was told is ready; `{"stalled": [rank, attempt, seconds, requests]}`, once a second while a
ready rank holds its requests and sends nothing back for --stall-timeout (activity.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from vllm_dp_supervisor.core.snapshot import PodView

MAX_LINE = 1 << 20  # a stats message of a few hundred ranks is tens of KiB


def view_message(view: PodView) -> bytes:
    """The ranks a worker may route to: those serving, whatever the pod's own readiness (a
    drained or stopping pod still answers what reaches it until its router drains)."""
    ready = [[r.rank, r.port, r.attempt] for r in view.ranks if r.serving]
    return json.dumps({"view": {"v": view.version, "ready": ready}}, separators=(",", ":")).encode() + b"\n"


def ready_ranks(view: dict[str, Any]) -> dict[int, tuple[int, int]]:
    return {int(rank): (int(port), int(attempt)) for rank, port, attempt in view.get("ready", [])}


async def read(reader: asyncio.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """Messages until the other side closes; a line that is not a JSON object is skipped."""
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except (asyncio.IncompleteReadError, ConnectionError):  # closed, or reset as the other side exited
            return
        except asyncio.LimitOverrunError as exc:
            await reader.readexactly(exc.consumed)  # drop the oversized line, keep the channel
            continue
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict):
            yield message

