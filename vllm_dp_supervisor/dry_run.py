"""`--dry-run`: what a run would start, printed, and nothing started.

Every check a real start makes before it starts a process has run by the time this prints (the
command line, the environment, the server command, the devices, the ports). Secrets never reach
the output: a server argument whose flag names a key, token, secret or password, and an
environment variable whose name does, are shown as <redacted>.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Sequence
from typing import Any

from vllm_dp_supervisor.settings import service_links
from vllm_dp_supervisor.settings.config import Config
from vllm_dp_supervisor.settings.plan import RankSpec

REDACTED = "<redacted>"
_SECRET_NAME = re.compile(r"key|token|secret|passw|credential", re.I)


def redacted_argv(argv: Sequence[str]) -> list[str]:
    """`--api-key K` and `--api-key=K` → `--api-key <redacted>`; every value after a secret flag
    (vLLM's --api-key takes several)."""
    out: list[str] = []
    secret = False
    for arg in argv:
        if arg.startswith("-"):
            flag, eq, _ = arg.partition("=")
            secret = bool(_SECRET_NAME.search(flag))
            out.append(f"{flag}={REDACTED}" if eq and secret else arg)
            if eq:
                secret = False
        else:
            out.append(REDACTED if secret else arg)
    return out


def redacted_env(env: dict[str, str]) -> dict[str, str]:
    return {k: REDACTED if _SECRET_NAME.search(k) else v for k, v in sorted(env.items())}


def plan(config: Config, specs: Sequence[RankSpec]) -> dict[str, Any]:
    return {
        "mode": config.mode.value,
        "supervisor": f"{config.api_host}:{config.supervisor_port}",
        "router": None if config.router_port is None else f"{config.router_listen_host}:{config.router_port}",
        "ranks": [{"rank": s.rank, "port": s.port, "device_kind": s.device_kind.value,
                   "devices": s.devices_text or None, "argv": redacted_argv(s.argv),
                   "env": redacted_env(dict(s.env))} for s in specs],
    }


def render_text(config: Config, specs: Sequence[RankSpec], removed: Sequence[str] = ()) -> str:
    """`removed`: the environment's service-link variables taken out (settings/service_links.py)."""
    p = plan(config, specs)
    lines = [f"dry run: {len(specs)} rank(s) in {p['mode']} mode; nothing was started",
             *([service_links.message(list(removed))] if removed else []),
             f"supervisor API on {p['supervisor']}; " + (f"router on {p['router']}" if p["router"] else "no router")]
    for rank in p["ranks"]:
        devices = f"{rank['device_kind']} {rank['devices']}" if rank["devices"] else rank["device_kind"]
        lines.append(f"rank {rank['rank']}: port {rank['port']}, devices {devices}")
        lines.append(f"  argv: {shlex.join(rank['argv'])}")
        lines.append("  env (on top of the supervisor's own): "
                     + " ".join(f"{k}={shlex.quote(v)}" for k, v in rank["env"].items()))
    return "\n".join(lines) + "\n"


def render_json(config: Config, specs: Sequence[RankSpec], removed: Sequence[str] = ()) -> str:
    return json.dumps({**plan(config, specs), "removed_from_environment": list(removed)}, indent=2) + "\n"
