"""Shared memory a killed vLLM tree leaves in /dev/shm that no process maps or holds open.

multiprocessing names a semaphore `sem.mp-*` and a shared-memory segment `psm_*` (vLLM's message
queues between its server, engine and workers are these) and leaves their unlinking to their
creator's close or the resource tracker at shutdown. When the tree's processes are SIGKILLed
before they shut down (a crashed rank whose engine is slow to act on SIGTERM under load), the
files stay: a semaphore in CI, a segment of a rank still loading when the supervisor was
SIGKILLed (the supervisor's scan of what a tree maps, process.py, runs at readiness and exit).

Only files created after a given time (their ctime) and used by no process on the machine are
returned: such a file can only be reached by its name again, which multiprocessing does only
while its creator still holds it. Reads /proc: call it off the event loop. The guardian
(guardian.py, standard library only) sweeps the same way when the supervisor dies.
"""

from __future__ import annotations

from vllm_dp_supervisor.procs import guardian


def unused_shared_memory(created_after: float) -> list[str]:
    """`sem.mp-*` and `psm_*` files created after `created_after` (wall clock) that no process
    maps or holds: the guardian's rule (guardian.unused_shared_memory), sorted."""
    return sorted(guardian.unused_shared_memory(created_after))
