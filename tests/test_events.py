"""events.py and the /events endpoint's flow control, on the event loop without processes."""

from __future__ import annotations

import asyncio

import pytest

from vllm_dp_supervisor.api import server as api
from vllm_dp_supervisor.core.events import HISTORY, SUBSCRIBER_QUEUE, EventLog


def run(coro):
    return asyncio.run(coro)


def test_history_keeps_the_last_events_with_increasing_ids():
    log = EventLog()
    for i in range(HISTORY + 10):
        log.publish("state", i % 3, n=i)
    kept = log.since(0)
    assert len(kept) == HISTORY and kept[0].id == 11 and kept[-1].id == HISTORY + 10
    assert [e.id for e in log.since(HISTORY + 5)] == [HISTORY + 6 + i for i in range(5)]
    assert kept[-1].as_dict() == {"id": HISTORY + 10, "time": kept[-1].time, "kind": "state",
                                  "rank": (HISTORY + 9) % 3, "n": HISTORY + 9}


def test_a_subscriber_that_never_reads_is_dropped_and_publishing_never_waits():
    async def scenario():
        log = EventLog()
        stream = log.follow(None)
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # subscribed, waiting for its first event
        for i in range(SUBSCRIBER_QUEUE * 3):  # synchronous: it cannot wait on anyone
            log.publish("state", 0, n=i)
        got = [await first] + [e async for e in stream]
        return got
    got = run(scenario())
    # it received what fitted in its queue, then its stream ended instead of holding us back
    assert len(got) == SUBSCRIBER_QUEUE
    assert [e.details["n"] for e in got] == list(range(SUBSCRIBER_QUEUE))


def test_replay_then_live_without_duplicates_and_close_ends_streams():
    async def scenario():
        log = EventLog()
        for i in range(5):
            log.publish("state", 0, n=i)
        received = []

        async def reader():
            async for e in log.follow(2):
                received.append(e.id)
        task = asyncio.ensure_future(reader())
        await asyncio.sleep(0.01)
        log.publish("exit", 0)
        await asyncio.sleep(0.01)
        log.close()
        await asyncio.wait_for(task, 1)
        late = [e.id async for e in log.follow(5)]  # after close: the replay, then the end
        return received, late
    received, late = run(scenario())
    assert received == [3, 4, 5, 6]
    assert late == [6]


def test_a_client_whose_socket_never_drains_is_cut_off(monkeypatch):
    monkeypatch.setattr(api, "EVENT_SEND_TIMEOUT_S", 0.1)

    async def scenario():
        log = EventLog()
        log.publish("state", 0)
        sent = []

        async def send(message):
            sent.append(message)
            if message.get("type") == "http.response.body":
                await asyncio.Event().wait()  # a full socket: never accepts the chunk

        async def receive():
            await asyncio.Event().wait()  # the client never disconnects either
        scope = {"type": "http", "headers": [(b"last-event-id", b"0")], "query_string": b""}
        await asyncio.wait_for(api.EventStream(log, lambda authorization: False)(scope, receive, send), 2)
        return sent
    sent = run(scenario())
    assert sent[0]["status"] == 200 and len(sent) == 2  # headers, then the one chunk that hung


@pytest.mark.parametrize("header,expected", [(b"12", 12), (b" 7 ", 7), (b"x", False), (b"-1", False)])
def test_last_event_id_parsing(header, expected):
    assert api._last_event_id({"headers": [(b"last-event-id", header)]}) == expected
    assert api._last_event_id({"headers": [], "query_string": b""}) is None
