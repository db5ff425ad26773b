"""What the loops saw, as values: the only way a loop tells the state machine anything.

Each observation names the rank and the attempt it was about. A loop started for attempt 3 may
still report after attempt 4 began (a probe in flight, an exit seen late); the machine drops such
reports in one place (`Machine.report`), so no loop has to ask whether it is still current.
"""

from __future__ import annotations

import dataclasses

from vllm_dp_supervisor.server.probes import ProbeResult


@dataclasses.dataclass(frozen=True)
class Observation:
    rank: int
    attempt: int


@dataclasses.dataclass(frozen=True)
class Exited(Observation):
    """The rank's server process ended (seen on its pidfd)."""
    returncode: int  # negative: killed by that signal
    oom_killed: bool | None = None  # the kernel's OOM killer killed in our cgroup meanwhile (None: unknown)


@dataclasses.dataclass(frozen=True)
class Probed(Observation):
    """A /health probe came back; `since_start`: seconds since this attempt's process started."""
    result: ProbeResult
    since_start: float


@dataclasses.dataclass(frozen=True)
class DeepProbed(Observation):
    """A one-token completion to a ready rank came back."""
    result: ProbeResult


@dataclasses.dataclass(frozen=True)
class Squatted(Observation):
    """Something answered on the rank's port, but the port is held by other processes."""
    pids: tuple[int, ...]
    description: str


@dataclasses.dataclass(frozen=True)
class Faulted(Observation):
    """vLLM's fault-tolerance status shows a faulted engine in this rank."""
    engines: tuple[dict, ...]


@dataclasses.dataclass(frozen=True)
class RecoveryEnded(Observation):
    """The in-engine recovery begun by a `Faulted` ended: `why_not` is None when it worked."""
    why_not: str | None


@dataclasses.dataclass(frozen=True)
class Unreachable(Observation):
    """The router could not connect to a rank it was told is ready."""
    why: str


@dataclasses.dataclass(frozen=True)
class Stalled(Observation):
    """The router holds `requests` on the rank and it has sent nothing back for `quiet_s` s."""
    quiet_s: float
    requests: int


@dataclasses.dataclass(frozen=True)
class Idle(Observation):
    """A stalled rank's engine did no work for a moment (no CPU used, no token counted): out of
    rotation while it is judged further (loops/judge.py)."""
    detail: str


@dataclasses.dataclass(frozen=True)
class Busy(Observation):
    """A stalled rank's engine works (it uses a CPU): in rotation, judged until a token comes."""
    detail: str


@dataclasses.dataclass(frozen=True)
class Judged(Observation):
    """The end of a stalled rank's judgment: it works (True: its token counters moved, or it
    answered a one-token completion), it is hung (False: no work at all for a while, or busy for
    long with nothing out: spinning), or nothing could be read (None: it says nothing either way)."""
    progressed: bool | None
    detail: str
