"""guard.py and guardian.py: when the supervisor's end of the pipe closes (it died), the guardian
removes the shared memory the ranks made since the supervisor started and no one uses any more,
even what the supervisor never saw (a rank still loading); never an older file, nor one a live
process holds."""

from __future__ import annotations

import os
import time
import uuid

from vllm_dp_supervisor.procs.guard import SINCE_MARGIN_S, TreeGuard


def shm(prefix: str) -> str:
    path = f"/dev/shm/{prefix}{uuid.uuid4().hex[:8]}"
    open(path, "w").close()
    return path


def test_the_guardian_sweeps_only_new_unused_segments_and_semaphores():
    older = shm("psm_test")
    time.sleep(SINCE_MARGIN_S + 0.1)  # its ctime before the guard's start, margin included
    guard = TreeGuard()
    guard.start()
    new_segment, new_semaphore, held = shm("psm_test"), shm("sem.mp-test"), shm("psm_test")
    said = shm("other_test")  # not a multiprocessing name: removed only because it was named
    guard.cleanup_files([said])
    holder = open(held)  # noqa: SIM115 (a live process holds it while the guardian looks)
    try:
        guard.close()  # end of file: what the guardian does when the supervisor dies
        assert not os.path.exists(new_segment) and not os.path.exists(new_semaphore) and not os.path.exists(said)
        assert os.path.exists(older) and os.path.exists(held)
    finally:
        holder.close()
        for path in (older, new_segment, new_semaphore, held, said):
            if os.path.exists(path):
                os.unlink(path)
