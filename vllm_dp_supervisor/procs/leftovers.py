"""Semaphores a killed vLLM tree leaves in /dev/shm that no process maps or holds open.

multiprocessing names a semaphore `sem.mp-*` and leaves its unlinking to the resource tracker at
shutdown; one that every process has closed is mapped by none, so the supervisor's scan of what a
tree maps (rank.py) never sees it. When the tree's workers are SIGKILLed before they shut down
(a crashed rank whose engine is slow to act on SIGTERM under load), the file stays: seen in CI.

Only files created while the attempt ran (their ctime) and used by no process on the machine are
returned: such a semaphore can only be reached by its name again, which multiprocessing does
only while its creator still holds it. Reads /proc: call it off the event loop.
"""

from __future__ import annotations

import glob
import os

from vllm_dp_supervisor.procs import linux

PATTERN = "/dev/shm/sem.mp-*"


def unused_semaphores(created_after: float) -> list[str]:
    """`sem.mp-*` files created after `created_after` (wall clock) that no process maps or holds."""
    candidates = set()
    for path in glob.glob(PATTERN):
        try:
            if os.stat(path).st_ctime >= created_after:
                candidates.add(path)
        except OSError:
            continue
    if not candidates:
        return []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        candidates -= linux.shm_files_of(pid)  # what it maps or holds open
        if not candidates:
            break
    return sorted(candidates)
