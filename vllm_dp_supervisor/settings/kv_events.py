"""Each rank's KV-cache events, which the cache router policy reads: the `--kv-events-config` a
rank is given and where the router subscribes to it. Pure.

vLLM 0.32 publishes on a ZMQ endpoint it binds when the endpoint has `*` or `::` (tcp) or is
`ipc://`, and offsets a tcp port by the engine's data-parallel index (an ipc path it cannot
offset, and refuses). So:
- replicas mode (every engine's index is 0): the supervisor gives each rank its own endpoints,
  Unix sockets in the rank's scratch directory, which nothing off this machine can read (the
  events carry the prompts' token ids). A user's own config is kept, with its port moved by the
  rank's index (its ipc path suffixed), as vLLM moves it for a data-parallel rank.
- dp mode: vLLM offsets the port by the global rank itself: the same config goes to every rank,
  tcp on every interface (vLLM binds nothing else that it can offset), at --kv-events-port (or
  the user's own port) plus the global rank; the replay endpoints follow the data-parallel size
  later.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from vllm_dp_supervisor.settings.config import Config, ConfigError, Mode, reachable_host, url_host

FLAG = "--kv-events-config"
EVENTS_FILE, REPLAY_FILE = "kv-events", "kv-replay"


@dataclasses.dataclass(frozen=True)
class RankEvents:
    events: str  # where a subscriber connects
    replay: str | None
    config: str | None  # the JSON this rank is given (None: the user's own, unchanged)


def user_config(config: Config) -> dict[str, Any] | None:
    """The user's own --kv-events-config, read; ConfigError if the cache policy cannot use it."""
    text = config.server.value(FLAG)
    if text is None:
        if any(name.startswith(FLAG + ".") for name, _ in config.server.flags):
            raise ConfigError(f"give {FLAG} as one JSON object for --router-policy cache")
        return None
    try:
        given = json.loads(text)
    except ValueError:
        given = None
    if not isinstance(given, dict):
        raise ConfigError(f"server argument {FLAG} is not a JSON object")
    endpoint = given.get("endpoint", "tcp://*:5557")
    if not given.get("enable_kv_cache_events") or given.get("publisher", "null") != "zmq" or \
            not isinstance(endpoint, str) or not _binds(endpoint):
        raise ConfigError(f"--router-policy cache reads each rank's KV events: {FLAG} must enable them with "
                          "the zmq publisher on an endpoint the rank binds (tcp://*:PORT or ipc://PATH), "
                          "or be left to the supervisor")
    return {**given, "endpoint": endpoint}


def _binds(endpoint: str) -> bool:
    """Whether vLLM binds `endpoint` (a subscriber can connect) rather than connecting to it."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith("ipc://")


def _moved(endpoint: str | None, by: int) -> str | None:
    """`endpoint` moved for the engine `by` places along, as vLLM moves it for a DP rank."""
    if endpoint is None or by == 0:
        return endpoint
    if endpoint.startswith("ipc://"):
        return f"{endpoint}_rank{by}"
    base, port = endpoint.rsplit(":", 1)
    return f"{base}:{int(port) + by}" if int(port) else endpoint


def _subscriber(endpoint: str) -> str:
    """Where this machine connects to an endpoint the engine binds."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    host, port = endpoint[len("tcp://"):].rsplit(":", 1)
    host = host.strip("[]")
    return f"tcp://{url_host(reachable_host('::' if host == '::' else '0.0.0.0' if host == '*' else host))}:{port}"


def plan_events(config: Config, rank: int, rank_dir: str | None) -> RankEvents | None:
    """Rank `rank`'s events under the cache policy; None under another policy."""
    if not config.router_policy.reads_kv_events:
        return None
    given = user_config(config)
    dp = config.mode is Mode.DP
    if given is None:
        if not dp and rank_dir is not None:  # this rank's own, nothing to move
            given = {"endpoint": f"ipc://{rank_dir}/{EVENTS_FILE}", "replay_endpoint": f"ipc://{rank_dir}/{REPLAY_FILE}"}
        else:
            base = config.kv_events_port
            given = {"endpoint": f"tcp://*:{base}", "replay_endpoint": f"tcp://*:{base + config.dp_size}"}
        given = {"enable_kv_cache_events": True, "publisher": "zmq", **given}
        move = 0 if not dp and rank_dir is not None else rank
        ours = True
    else:
        move, ours = rank, not dp and rank > 0  # the user's, moved for this rank in replicas mode
    endpoint, replay = given["endpoint"], given.get("replay_endpoint")
    if dp:  # vLLM moves them by the global rank itself
        index = config.data_parallel_start_rank + rank
        if index and any(e is not None and not e.startswith("tcp://") for e in (endpoint, replay)):
            raise ConfigError(f"{FLAG}: vLLM offsets a data-parallel rank's endpoint by its rank, which it "
                              "cannot do for an ipc:// path; use tcp://*:PORT")
        events, replay_at = _moved(endpoint, index), _moved(replay, index)
    else:
        events, replay_at = _moved(endpoint, move), _moved(replay, move)
        given = {**given, "endpoint": events, "replay_endpoint": replay_at}
    assert events is not None
    text = json.dumps({k: v for k, v in given.items() if v is not None}, separators=(",", ":")) if ours else None
    return RankEvents(_subscriber(events), _subscriber(replay_at) if replay_at else None, text)


def prefix_caching_off(config: Config) -> bool:
    return config.server.present("--no-enable-prefix-caching") or \
        bool(re.fullmatch(r"(?i)false|0|no", config.server.value("--enable-prefix-caching") or "true"))
