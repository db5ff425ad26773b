"""What a rank's engine is doing, read from /proc: the CPU time its processes have used, and
whether one is stopped. A judge of a quiet rank (loops/judge.py) compares two readings: an
engine that holds requests and uses no CPU is doing nothing for now (stopped, deadlocked, or
waiting on a lock another rank holds); one that uses a core is working (a long prefill, a first
compile, a logprobs request's first pass), or spins without progress (a collective stuck
busy-waiting), which only time tells apart.

The engine is the server's descendants (vLLM's EngineCore and its workers): the API server's own
CPU is left out, since it answers the judge's probes and streams other clients' bytes whatever its
engine does. A server without descendants (a single-process server) is its own engine.

Must never: signal a process, or read anything but the tree's own /proc files. Each reading is
a few small reads of kernel pseudo-files, which never block: safe on the event loop.
"""

from __future__ import annotations

import os

from vllm_dp_supervisor.procs import linux

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(fields: list[str]) -> float:
    """User + system CPU seconds of a process, with those of the children it has waited for (a
    compiler it ran, a pool's worker), from its /proc stat fields."""
    # after the name: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime
    # stime cutime cstime
    return sum(int(f) for f in fields[11:15]) / CLOCK_TICKS


def reading(server_pid: int | None) -> tuple[float | None, bool]:
    """One look at the rank's tree, in one walk of it: the CPU seconds its engine has used so far
    (the server's descendants; the server itself when it has none), None when the server is
    gone; and whether a process of the tree, the server included, is stopped (state T: SIGSTOP),
    which leaves the rank unable to do any work until resumed. A tracer's stop (t) is not
    counted: a profiler (py-spy, strace) stops a healthy engine's processes briefly and often.

    Short-lived descendants count: seen here, vLLM's first logprobs pass on the CPU build compiles
    its sampler with torch.compile, whose C++ compilers run for seconds below the worker while the
    worker waits on them, using no CPU; once reaped, their time is their parent's (cutime). One
    reaped outside the tree takes its time with it: the next reading may be lower, which a judge
    reads as no work, never as more."""
    if server_pid is None:
        return None, False
    server = linux.stat_fields(server_pid)
    if server is None or len(server) < 15:
        return None, False
    engine = [f for f in map(linux.stat_fields, linux.descendants(server_pid)) if f is not None and len(f) >= 15]
    stopped = any(f[0] == "T" for f in (server, *engine))
    return sum(map(_cpu_seconds, engine or [server])), stopped
