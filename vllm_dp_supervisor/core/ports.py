"""What the core reads of the world and what it tells it, as protocols the composition root
fills at construction (supervisor.py). Standard library only, like the rest of the core.

- `Process` (with its `ProcessOutput`): what the machine reads of a rank's running process: its
  pid, when it started, its last words. `procs.process.RankProcess` provides it.
- `Counters`: what the machine counts as it decides. `api.metrics.PodMetrics` provides it (as
  Prometheus series); a test may pass any object with these methods.

What the machine wants carried out (a restart sequence, a rollout, a judgment) goes out as
orders (orders.py), not through a port: the machine never holds a mechanism.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol


class ProcessOutput(Protocol):
    """A rank's output as the core and /status read it."""
    @property
    def last_line(self) -> str | None: ...
    @property
    def stderr_tail(self) -> Iterable[str]: ...
    @property
    def log_dir(self) -> Path | None: ...
    def last_error(self) -> str | None: ...


class Process(Protocol):
    """One attempt's process, read only."""
    @property
    def pid(self) -> int | None: ...
    @property
    def started_at(self) -> float | None: ...  # wall clock
    @property
    def started_monotonic(self) -> float | None: ...
    @property
    def output(self) -> ProcessOutput: ...
    @property
    def starting_readout(self) -> dict[str, Any] | None: ...  # while it starts: CPU, output, kernel wait


class Counters(Protocol):
    """What the machine counts. Labels are the rank's number and a reason's short name."""
    def restarted(self, rank: int) -> None: ...
    def exited(self, rank: int, reason: str) -> None: ...
    def probed(self, rank: int, seconds: float, failure: str | None, starting: bool) -> None: ...
    def deep_probe_failed(self, rank: int, reason: str) -> None: ...
