"""The router: the pod's one OpenAI-compatible port, in front of the ready ranks only. This package
is the worker program (`python -m vllm_dp_supervisor.router.worker`); the supervisor starts and
feeds its processes from `router_workers/`, over the messages `protocol.py` owns.

A worker runs in its own process, never in the supervisor's event loop: proxying bytes must not
delay death detection or probes. Every worker accepts on the one socket the supervisor binds, which
keeps its copy open, so a connection that arrives while a worker restarts waits in the backlog.

In a worker: `client.py` parses a request; `proxy.Router` holds what requests share (the ready
ranks, the policy, the connections to the ranks, their activity); `passage.Passage` is one
request's life: pick a rank (`policies/`), send (`exchange.py`, `upstream.py`), then retry,
continue (`continuation.py`, `stream.py`, `stop.py`), cut or complete, and record. What may be
retried and how errors look to an OpenAI client is in `routes.py`.

Must never: write rank state (a worker reports what it saw; the machine decides), or load the
supervisor's side: no module of `core`, `loops`, `procs`, `api` or `router_workers`, no
prometheus_client (tests/unit/test_layers.py checks a real worker's `sys.modules`).
"""
