"""GET /events: the machine's event log as Server-Sent Events. Never slows the supervisor: a
client too slow or too far behind is dropped, and it may reconnect with Last-Event-ID to replay
what it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from starlette.types import Receive, Scope, Send

from vllm_dp_supervisor.api.probes import ascii_number
from vllm_dp_supervisor.core.events import EventLog

log = logging.getLogger("supervisor")
# A client whose socket takes longer than this to accept one event is dropped.
EVENT_SEND_TIMEOUT_S = 5.0
# /events streams at once: each holds a connection the connection cap cannot reclaim.
MAX_EVENT_STREAMS = 64
EVENT_ID_DIGITS = 18


class EventStream:
    """GET /events: Server-Sent Events. `Last-Event-ID` (header or ?last_event_id=) replays what
    the client missed. A client too slow to take an event in EVENT_SEND_TIMEOUT_S, or so far
    behind that its queue overflowed, is dropped: the supervisor never waits for it."""

    def __init__(self, events: EventLog, may_read_rank_logs: Callable[[str | None], bool]) -> None:
        self._events = events
        self._may_read_rank_logs = may_read_rank_logs
        self._streams = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        last_id = _last_event_id(scope)
        authorization = dict(scope.get("headers") or []).get(b"authorization")
        rank_logs = self._may_read_rank_logs(None if authorization is None else authorization.decode("latin-1"))
        if last_id is False:
            await _send_json(send, 400, b'{"error": "Last-Event-ID must be a non-negative integer of at most '
                                        + str(EVENT_ID_DIGITS).encode() + b' digits"}')
            return
        if self._streams >= MAX_EVENT_STREAMS:
            await _send_json(send, 503, b'{"error": "too many /events streams"}')
            return
        self._streams += 1
        try:
            await self._serve(send, receive, last_id, rank_logs)
        finally:
            self._streams -= 1

    async def _serve(self, send: Send, receive: Receive, last_id: int | None, rank_logs: bool) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]})
        disconnected = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await self._stream(send, last_id, disconnected, rank_logs)
        finally:
            disconnected.cancel()

    async def _stream(self, send: Send, last_id: int | None, disconnected: asyncio.Future, rank_logs: bool) -> None:
        async def push(chunk: bytes) -> bool:
            sending = asyncio.ensure_future(send({"type": "http.response.body", "body": chunk, "more_body": True}))
            done, _ = await asyncio.wait({sending, disconnected}, timeout=EVENT_SEND_TIMEOUT_S,
                                         return_when=asyncio.FIRST_COMPLETED)
            if sending not in done:
                sending.cancel()
                if not disconnected.done():
                    log.warning("an /events client took over %g s to read: dropped", EVENT_SEND_TIMEOUT_S)
                return False
            return not disconnected.done()

        if not await push(b": connected\n\n"):
            return
        async with contextlib.aclosing(self._events.follow(last_id)) as stream:
            async for event in stream:
                if not await push(b": keep-alive\n\n" if event is None else event.sse(rank_logs)):
                    return
        if not self._events.closed:
            log.warning("an /events client fell too far behind: dropped")
            return  # not waiting to tell it: uvicorn closes the connection
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(send({"type": "http.response.body", "body": b"", "more_body": False}),
                                   EVENT_SEND_TIMEOUT_S)


def _last_event_id(scope: Scope) -> int | bool | None:
    """The id to replay after; None for none; False when malformed."""
    raw = dict(scope.get("headers") or []).get(b"last-event-id")
    if raw is None:
        from urllib.parse import parse_qs
        values = parse_qs(scope.get("query_string", b"").decode(errors="replace")).get("last_event_id")
        raw = values[-1].encode() if values else None
    if raw is None:
        return None
    number = ascii_number(raw.decode(errors="replace"), EVENT_ID_DIGITS)
    return False if number is None else number


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_json(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
