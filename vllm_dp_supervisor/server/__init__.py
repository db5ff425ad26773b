"""What the supervisor knows of vLLM: how its command line and config file are read (`args`), how
its output lines are decorated (`lines`), what a probe of it found (`probes`), and the HTTP client
that asks it (`client`). A vLLM upgrade that changes any of these lands here and nowhere else.

Must never: import another package of the supervisor, or import vLLM (it is launched as a
command). Only `client` uses aiohttp; it is loaded when `Prober` is first asked for, so the pure
parts stay importable by the core.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm_dp_supervisor.server.args import ServerArgs, ServerArgsError, read_server_args
from vllm_dp_supervisor.server.probes import ProbeFailure, ProbeResult

if TYPE_CHECKING:
    from vllm_dp_supervisor.server.client import Prober

__all__ = ["ProbeFailure", "ProbeResult", "Prober", "ServerArgs", "ServerArgsError", "read_server_args"]


def __getattr__(name: str) -> Any:
    if name == "Prober":
        from vllm_dp_supervisor.server.client import Prober
        return Prober
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
