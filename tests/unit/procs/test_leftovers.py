"""leftovers.py: a semaphore or segment file nobody uses, created after a given time, is found;
one a process holds, or one older than that time, is not."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from vllm_dp_supervisor.procs.leftovers import unused_shared_memory


@pytest.mark.parametrize("prefix", ["sem.mp-test", "psm_test"])
def test_only_new_shared_memory_that_nobody_uses_is_found(prefix):
    before = time.time() - 1
    unused = f"/dev/shm/{prefix}{uuid.uuid4().hex[:8]}"
    held = f"/dev/shm/{prefix}{uuid.uuid4().hex[:8]}"
    open(unused, "w").close()
    holder = open(held, "w")  # noqa: SIM115 (this process holds it open while we look)
    try:
        found = unused_shared_memory(before)
        assert unused in found and held not in found
        assert unused not in unused_shared_memory(time.time() + 60)  # created before that time
    finally:
        holder.close()
        for path in (unused, held):
            os.unlink(path)
