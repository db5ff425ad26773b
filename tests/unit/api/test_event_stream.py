"""api/event_stream.py: /events' flow control and Last-Event-ID, on the event loop without processes."""

from __future__ import annotations

import asyncio

import pytest

from vllm_dp_supervisor.api import event_stream
from vllm_dp_supervisor.core.events import EventKind, EventLog


def run(coro):
    return asyncio.run(coro)


def test_a_client_whose_socket_never_drains_is_cut_off(monkeypatch):
    monkeypatch.setattr(event_stream, "EVENT_SEND_TIMEOUT_S", 0.1)

    async def scenario():
        log = EventLog()
        log.publish(EventKind.STATE, 0)
        sent = []

        async def send(message):
            sent.append(message)
            if message.get("type") == "http.response.body":
                await asyncio.Event().wait()  # a full socket: never accepts the chunk

        async def receive():
            await asyncio.Event().wait()  # the client never disconnects either
        scope = {"type": "http", "headers": [(b"last-event-id", b"0")], "query_string": b""}
        await asyncio.wait_for(event_stream.EventStream(log, lambda authorization: False)(scope, receive, send), 2)
        return sent
    sent = run(scenario())
    assert sent[0]["status"] == 200 and len(sent) == 2  # headers, then the one chunk that hung


@pytest.mark.parametrize("header,expected", [(b"12", 12), (b" 7 ", 7), (b"x", False), (b"-1", False)])
def test_last_event_id_parsing(header, expected):
    assert event_stream._last_event_id({"headers": [(b"last-event-id", header)]}) == expected
    assert event_stream._last_event_id({"headers": [], "query_string": b""}) is None
