"""The loops around the state machine (core/machine.py), one module each, each handed its
collaborators at construction.

Observers report what they saw as observations (core/observations.py) tagged with rank and
attempt: `spawn` (start a rank's attempt, watch it exit on a pidfd), `health` (/health and the
deep probe), `recovery` (vLLM's in-engine fault tolerance), `signals` (the handler queues, one task
dispatches). Mechanisms carry out the machine's orders (core/orders.py) through its verbs:
`teardown` (stop trees and verify them gone; reap; keep the guardian running), `restart` (the
restart sequence of a group), `rollout` (every group in turn), `judge` (a stalled rank's token
counters). `tasks` keeps every background task so a stop can cancel them all.

Must never: assign a rank's state (only the machine does), or read another attempt's state than
the one a loop was started for.
"""

from vllm_dp_supervisor.loops.health import Health
from vllm_dp_supervisor.loops.judge import Judge
from vllm_dp_supervisor.loops.recovery import Recovery
from vllm_dp_supervisor.loops.restart import Restarter
from vllm_dp_supervisor.loops.rollout import Rollout
from vllm_dp_supervisor.loops.signals import Signals
from vllm_dp_supervisor.loops.spawn import Spawner
from vllm_dp_supervisor.loops.tasks import Tasks
from vllm_dp_supervisor.loops.teardown import Teardown

__all__ = ["Health", "Judge", "Recovery", "Restarter", "Rollout", "Signals", "Spawner", "Tasks", "Teardown"]
