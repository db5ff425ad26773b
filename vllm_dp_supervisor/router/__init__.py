"""The router: the pod's one OpenAI-compatible port, in front of the ready ranks only.

It runs in worker processes (`worker.py`), never in the supervisor's event loop: proxying bytes
must not delay death detection or probes. The supervisor binds the port once and every worker
accepts on that one socket; the supervisor keeps its copy open, so a connection that arrives
while a worker restarts waits in the backlog instead of being refused. `workers.py` (in the
supervisor) starts, watches and restarts the workers like ranks, sends each the published view
of the ranks (`protocol.py`) on every change, and takes back what they saw: a rank that refused
a connection (an observation for the state machine, which decides) and their counters
(`stats.py`, served on the supervisor's /metrics).

A worker (`proxy.py`, `upstream.py`) parses requests with httptools, picks a rank with
`balance.py`, forwards head and body unchanged but for hop-by-hop headers, and streams the answer
back as it arrives, reading from the rank only as fast as the client takes it. What may be
retried and how errors look to an OpenAI client is in `routes.py`. Every message between the two
sides is built and read in `protocol.py`.

Must never: write rank state (a worker reports what it saw; the machine decides), or load more in
a worker than it routes with: `RouterWorkers`, the supervisor's side, is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm_dp_supervisor.router.workers import RouterWorkers

__all__ = ["RouterWorkers"]


def __getattr__(name: str) -> Any:
    if name == "RouterWorkers":
        from vllm_dp_supervisor.router.workers import RouterWorkers
        return RouterWorkers
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
