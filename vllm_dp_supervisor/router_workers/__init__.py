"""The router's workers, from the supervisor's side: it starts each worker process (the program in
`router/`) on the router's one listening socket, sends it the published view of the ranks on
every change, reads what it reports (counters, in-flight load, unreachable and stalled ranks,
continued streams), restarts one that dies, and drains them all at the stop.

`workers.py` is the keeper; `collector.py` and `cache_metrics.py` sum the workers' counters into
the supervisor's /metrics. Every message is built and read by `router/protocol.py`, the only module
of `router/` this package imports (with its stats buckets): what a worker reports becomes one of
the machine's observations here, never in the worker.

Must never: proxy a byte (the supervisor's loop detects deaths and answers probes), or write rank
state but through `Machine.report`.
"""

from __future__ import annotations

from vllm_dp_supervisor.router_workers.workers import RouterWorkers

__all__ = ["RouterWorkers"]
