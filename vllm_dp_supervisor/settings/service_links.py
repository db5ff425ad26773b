"""Kubernetes service links that would break the pod, found in an environment. Pure, standard
library only; `cli.main` removes what `injected` names from its own environment before it reads a
setting or starts a rank, and logs the names once.

Unless a pod sets `enableServiceLinks: false`, the kubelet gives it, for every Service of its
namespace, `<NAME>_SERVICE_HOST`, `<NAME>_SERVICE_PORT` and `<NAME>_PORT=tcp://<ip>:<port>` (and
`<NAME>_PORT_<port>_<PROTO>=...`), NAME the Service's name upper-cased with dashes as
underscores. A Service named `vllm` so sets `VLLM_PORT=tcp://10.96.0.12:8000`, which vLLM reads
as its own port setting and dies on after loading its model ("appears to be a URI"); one named
`supervisor` sets `SUPERVISOR_PORT`, which the supervisor reads as its --port. No one sets such a
value on purpose (both want a number), so a variable under a prefix the pod reads whose name and
value have a service link's shape is removed, with the rest of that Service's links
(`<NAME>_SERVICE_HOST`, `<NAME>_PORT_8000_TCP_ADDR`, ...): vLLM reads none of them, but with
--fail-on-environ-validation it refuses an environment holding a VLLM_ variable it does not
know. Every other variable is left as it is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

PREFIXES = ("VLLM_", "SUPERVISOR_")  # what vLLM and the supervisor read settings from
_NAME = re.compile(r"(?P<service>[A-Z0-9_]+)_PORT(_[0-9]+_(TCP|UDP|SCTP))?")
_LINK = re.compile(r"(tcp|udp|sctp)://[^\s/]+:[0-9]+")
_FAMILY = r"{}_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT|PORT_[0-9]+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)"


def injected(environ: Mapping[str, str]) -> list[str]:
    """The names, sorted, of the service-link variables in `environ` that a rank or the supervisor
    would read: each link under a prefix the pod reads, and the rest of its Service's links."""
    services = {m["service"] for name, value in environ.items()
                if name.startswith(PREFIXES) and (m := _NAME.fullmatch(name)) and _LINK.fullmatch(value)}
    family = [re.compile(_FAMILY.format(re.escape(service))) for service in services]
    return sorted(name for name in environ if any(f.fullmatch(name) for f in family))


def message(names: list[str]) -> str:
    return (f"removed from the environment before reading it: {', '.join(names)} (Kubernetes service links of a "
            "Service whose name is a prefix vLLM or the supervisor reads settings under; set "
            "enableServiceLinks: false in the pod spec, or rename the Service)")


def service_env_prefix(service: str) -> str:
    """The prefix of the variables the kubelet makes for a Service named `service`."""
    return service.upper().replace("-", "_") + "_"
