"""The router: the pod's one OpenAI-compatible port, in front of the ready ranks only.

It runs in worker processes (`worker.py`), never in the supervisor's event loop: proxying bytes
must not delay death detection or probes. The supervisor binds the port once and every worker
accepts on that one socket; the supervisor keeps its copy open, so a connection that arrives
while a worker restarts waits in the backlog instead of being refused. `workers.py` (in the
supervisor) starts, watches and restarts the workers like ranks, sends each the published view
of the ranks (`channel.py`) on every change, and takes back what they saw: a rank that refused
a connection (an observation for the state machine, which decides) and their counters
(`stats.py`, served on the supervisor's /metrics).

A worker (`proxy.py`, `upstream.py`) parses requests with httptools, picks a rank with
`balance.py`, forwards head and body unchanged but for hop-by-hop headers, and streams the answer
back as it arrives, reading from the rank only as fast as the client takes it. What may be
retried and how errors look to an OpenAI client is in `routes.py`. The router never writes rank
state.
"""
