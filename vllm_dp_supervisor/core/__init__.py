"""The core: one state machine that alone writes every rank's state and the pod's, from what the
loops observed; the frozen view it publishes on every change; the events it tells; how a run ended.

Must not depend on any non-stdlib module, nor on a package of the supervisor but `settings` and
`server`'s pure facts (tests/unit/test_layers.py checks it). It touches no process, socket or
file: what it reads of a process and what it counts go through `ports.py`; what a mechanism must
carry out leaves as an order (`orders.py`).
"""

from vllm_dp_supervisor.core.events import EventKind, EventLog
from vllm_dp_supervisor.core.machine import Machine
from vllm_dp_supervisor.core.records import Attempt, RankRecord
from vllm_dp_supervisor.core.result import ExitResult
from vllm_dp_supervisor.core.snapshot import PodView, Snapshots
from vllm_dp_supervisor.core.states import RankState, SupervisorState

__all__ = ["Attempt", "EventKind", "EventLog", "ExitResult", "Machine", "PodView", "RankRecord", "RankState",
           "Snapshots", "SupervisorState"]
