"""leftovers.py: a semaphore file nobody uses, created after a given time, is found; one a
process holds, or one older than that time, is not."""

from __future__ import annotations

import os
import time
import uuid

from vllm_dp_supervisor.procs.leftovers import unused_semaphores


def test_only_new_semaphores_that_nobody_uses_are_found():
    before = time.time() - 1
    unused = f"/dev/shm/sem.mp-test{uuid.uuid4().hex[:8]}"
    held = f"/dev/shm/sem.mp-test{uuid.uuid4().hex[:8]}"
    open(unused, "w").close()
    holder = open(held, "w")  # noqa: SIM115 (this process holds it open while we look)
    try:
        found = unused_semaphores(before)
        assert unused in found and held not in found
        assert unused not in unused_semaphores(time.time() + 60)  # created before that time
    finally:
        holder.close()
        for path in (unused, held):
            os.unlink(path)
