"""router/protocol.py: every message either side builds is read back as it was meant, and a
malformed one is skipped, never raised."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_dp_supervisor.router import protocol
from vllm_dp_supervisor.router.stats import WorkerStats
from vllm_dp_supervisor.settings.config import ModelSource
from vllm_dp_supervisor.settings.options import parse_config
from vllm_dp_supervisor.settings.plan import Inventory, plan_ranks, router_settings


def decode(data: bytes) -> dict:
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    return json.loads(data)


def test_the_settings_travel_as_one_message_and_come_back_whole():
    config = parse_config(["--dp-size-local", "2", "--router-policy", "prefix", "--router-session-header",
                           "X-Conv", "--stall-timeout", "0", "--host", "::"], {})
    settings = config.router_settings
    assert protocol.read_settings(decode(protocol.settings_message(settings))) == settings
    assert settings.host == "::1" and settings.stall_timeout == 0
    cache = parse_config(["--dp-size-local", "2", "--router-policy", "cache", "--", "org/m", "--revision", "v2",
                          "--chat-template", "t.jinja"], {})
    with_events = router_settings(cache, plan_ranks(cache, Inventory(gpus=(), cpus=(0, 1)), "/run/x"))
    assert protocol.read_settings(decode(protocol.settings_message(with_events))) == with_events
    assert with_events.model == ModelSource("org/m", revision="v2", chat_template="t.jinja", model_revision="v2",
                                            names=("org/m",))
    with pytest.raises(ValueError, match="not a settings message"):
        protocol.read_settings({"settings": {"policy": "no-such-policy"}})
    with pytest.raises(ValueError):
        protocol.read_settings({"view": {}})


def test_a_view_and_a_drain_come_back_as_sent():
    message = protocol.view_message(7, [(0, 8000, 2)], [(0, 2, True), (1, 0, True), (2, 3, False)])
    assert protocol.read_view(decode(message)) == protocol.View(7, {0: (8000, 2)},
                                                                {0: (2, True), 1: (0, True), 2: (3, False)})
    assert protocol.read_drain(decode(protocol.drain_message(2.5))) == 2.5
    assert protocol.read_view({"drain": 1}) is None and protocol.read_drain({"view": {}}) is None


def test_what_a_worker_reports_is_read_back_typed():
    load = protocol.read_load(decode(protocol.load_message(3, {0: 2, 1: 0}, [0])))
    assert load == protocol.Load(3, {0: 2}, frozenset({0}))
    seen = protocol.read_report(decode(protocol.unreachable_message(1, 4, "x" * 500)))
    assert seen == protocol.Unreachable(1, 4, "x" * protocol.WHY_CHARS)
    assert protocol.read_report(decode(protocol.stalled_message(0, 2, 3.14159, 5))) == protocol.Stalled(0, 2, 3.142, 5)
    assert protocol.read_resumed(decode(protocol.resumed_message(0, 1, 12, 0.25))) == protocol.Resumed(0, 1, 12, 0.25)
    stats = WorkerStats().report({1: 2}, {"home": 1}, None)
    assert protocol.read_stats(decode(protocol.stats_message(stats))) == stats
    assert protocol.read_stats({"load": {}}) is None


@given(st.dictionaries(st.sampled_from(["view", "drain", "load", "unreachable", "stalled", "stats", "resumed"]),
                       st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                                        st.text(max_size=3), inner, max_size=3), max_leaves=8), max_size=3))
def test_a_malformed_message_is_skipped_never_raised(message):
    protocol.read_view(message)
    protocol.read_drain(message)
    protocol.read_load(message)
    protocol.read_report(message)
    protocol.read_resumed(message)
    protocol.read_stats(message)


def test_the_reader_skips_what_is_not_a_json_object_and_survives_an_oversized_line():
    async def scenario() -> list[dict]:
        reader = asyncio.StreamReader(limit=64)
        reader.feed_data(b'not json\n[1, 2]\n' + b'{"x": "' + b"y" * 200 + b'"}\n{"drain": 1}\n')
        reader.feed_eof()
        return [m async for m in protocol.read(reader)]
    assert asyncio.run(scenario()) == [{"drain": 1}]
