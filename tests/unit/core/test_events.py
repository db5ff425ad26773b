"""core/events.py: the bounded history and subscribers that never slow the supervisor down."""

from __future__ import annotations

import asyncio
import json

from vllm_dp_supervisor.core.events import HISTORY, SUBSCRIBER_QUEUE, EventKind, EventLog


def run(coro):
    return asyncio.run(coro)


def test_history_keeps_the_last_events_with_increasing_ids():
    log = EventLog()
    for i in range(HISTORY + 10):
        log.publish(EventKind.STATE, i % 3, n=i)
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
            log.publish(EventKind.STATE, 0, n=i)
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
            log.publish(EventKind.STATE, 0, n=i)
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


def test_an_sse_event_names_its_kind_so_eventsource_can_listen_by_kind():
    """Parsed as the EventSource spec reads a stream: `event` is the name addEventListener takes."""
    log = EventLog()
    log.publish(EventKind.EXIT, 1, reason="killed by SIGKILL")
    raw = log.since(0)[0].sse().decode()
    assert raw.endswith("\n\n") and "\r" not in raw
    fields = dict(line.split(": ", 1) for line in raw.strip("\n").split("\n"))
    assert fields["event"] == "exit" == EventKind.EXIT.value
    assert fields["id"] == "1"
    assert json.loads(fields["data"])["kind"] == "exit"
