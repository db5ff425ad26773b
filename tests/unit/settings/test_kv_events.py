"""kv_events.py: under the cache policy each rank publishes its KV events somewhere of its own, the
supervisor knows where, and a config of the user's it cannot read is refused before anything starts."""

from __future__ import annotations

import json

import pytest

from vllm_dp_supervisor.settings.config import ConfigError, Mode
from vllm_dp_supervisor.settings.kv_events import plan_events
from vllm_dp_supervisor.settings.options import parse_config
from vllm_dp_supervisor.settings.plan import Inventory, plan_ranks, router_settings

CPU2 = Inventory(gpus=(), cpus=(0, 1))


def config(*argv: str, child: tuple[str, ...] = ()):
    return parse_config(["--dp-size-local", "2", "--router-policy", "cache", *argv, "--", "org/model", *child], {})


def given(spec) -> dict:
    argv = list(spec.argv)
    return json.loads(argv[len(argv) - 1 - argv[::-1].index("--kv-events-config") + 1])


def test_replicas_publish_on_unix_sockets_in_their_own_directories():
    specs = plan_ranks(config(), CPU2, "/run/x")
    assert [given(s)["endpoint"] for s in specs] == ["ipc:///run/x/rank0/kv-events", "ipc:///run/x/rank1/kv-events"]
    assert specs[1].kv_events is not None and specs[1].kv_events.events == "ipc:///run/x/rank1/kv-events"
    assert specs[1].kv_events.replay == "ipc:///run/x/rank1/kv-replay"
    assert router_settings(config(), specs).kv_events == (
        (0, "ipc:///run/x/rank0/kv-events", "ipc:///run/x/rank0/kv-replay"),
        (1, "ipc:///run/x/rank1/kv-events", "ipc:///run/x/rank1/kv-replay"))


def test_a_user_s_tcp_config_is_kept_for_rank_0_and_moved_for_the_others_as_vllm_moves_a_dp_rank_s():
    user = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:6000",
                       "replay_endpoint": "tcp://*:6100", "topic": "kv", "buffer_steps": 50})
    specs = plan_ranks(config(child=("--kv-events-config", user)), CPU2, "/run/x")
    assert specs[0].argv.count("--kv-events-config") == 1  # the user's own, unchanged
    moved = given(specs[1])
    assert moved["endpoint"] == "tcp://*:6001" and moved["replay_endpoint"] == "tcp://*:6101"
    assert moved["topic"] == "kv" and moved["buffer_steps"] == 50
    assert [(s.kv_events.events, s.kv_events.replay) for s in specs if s.kv_events] == [
        ("tcp://127.0.0.1:6000", "tcp://127.0.0.1:6100"), ("tcp://127.0.0.1:6001", "tcp://127.0.0.1:6101")]


def test_dp_ranks_get_one_tcp_config_and_vllm_moves_it_by_their_global_rank():
    c = config("--mode", "dp", "--data-parallel-size", "4", "--data-parallel-start-rank", "2",
               "--kv-events-port", "7000")
    assert c.mode is Mode.DP
    specs = plan_ranks(c, Inventory(gpus=("0", "1"), cpus=(0,)), "/run/x")
    assert given(specs[0]) == given(specs[1]) and given(specs[0])["endpoint"] == "tcp://*:7000"
    assert [s.kv_events.events for s in specs if s.kv_events] == ["tcp://127.0.0.1:7002", "tcp://127.0.0.1:7003"]
    assert [s.kv_events.replay for s in specs if s.kv_events] == ["tcp://127.0.0.1:7006", "tcp://127.0.0.1:7007"]


def test_another_policy_adds_nothing():
    c = parse_config(["--dp-size-local", "2", "--", "m"], {})
    assert plan_events(c, 1, "/run/x") is None
    assert all("--kv-events-config" not in s.argv for s in plan_ranks(c, CPU2, "/run/x"))


@pytest.mark.parametrize(("child", "argv", "said"), [
    (("--kv-events-config", "not json"), (), "not a JSON object"),
    (("--kv-events-config", '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://host:1"}'), (),
     "must enable them"),
    (("--kv-events-config.endpoint", "tcp://*:1"), (), "as one JSON object"),
    (("--no-enable-prefix-caching",), (), "turn off"),
    (("--enable-prefix-caching", "false"), (), "turn off"),
    ((), ("--mode", "dp", "--kv-events-port", "65535"), "past 65535"),
    ((), ("--mode", "dp", "--kv-events-port", "8000"), "collide"),
])
def test_a_config_the_cache_policy_cannot_read_is_refused(child, argv, said):
    with pytest.raises(ConfigError, match=said):
        config(*argv, child=child)


def test_dp_ranks_cannot_offset_an_ipc_path():
    user = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "ipc:///x/e"})
    c = config("--mode", "dp", child=("--kv-events-config", user))
    with pytest.raises(ConfigError, match="ipc:// path"):
        plan_ranks(c, Inventory(gpus=("0", "1"), cpus=(0,)), "/run/x")
