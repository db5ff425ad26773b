"""What a rank's engine is doing, read from /proc: the CPU time its processes have used. A judge
of a quiet rank (loops/judge.py) compares two readings: an engine that holds requests and uses
no CPU at all is not working (SIGSTOPped, deadlocked, blocked on a lock or a dead peer); one that
uses a core is (a long prefill, a first-time compile, a logprobs request's first pass), or spins
without progress (a collective stuck busy-waiting), which only time tells apart.

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


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds `pid` has used, with those of the children it has waited for
    (a compiler it ran, a pool's worker), or None if it is gone."""
    fields = linux.stat_fields(pid)
    if fields is None or len(fields) < 15:
        return None
    # after the name: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime
    # stime cutime cstime
    return sum(int(f) for f in fields[11:15]) / CLOCK_TICKS


def stopped(server_pid: int | None) -> bool:
    """Whether a process of the rank's tree, its server included, is stopped (state T or t:
    SIGSTOP, a debugger's stop): until it is resumed, the rank can do no work at all."""
    if server_pid is None:
        return False
    for pid in (server_pid, *linux.descendants(server_pid)):
        fields = linux.stat_fields(pid)
        if fields is not None and fields[0] in ("T", "t"):
            return True
    return False


def engine_cpu_seconds(server_pid: int | None) -> float | None:
    """CPU seconds used so far by the engine below the rank's server (see the module's docstring);
    None when the server is gone. Short-lived descendants count: seen here, vLLM's first logprobs
    pass on the CPU build compiles its sampler with torch.compile, whose C++ compilers run for
    seconds below the worker while the worker itself waits on them, using no CPU; once reaped,
    their time is their parent's (cutime). One reaped outside the tree takes its time with it:
    the next reading may be lower, which a judge reads as no work, never as more."""
    if server_pid is None:
        return None
    engine = linux.descendants(server_pid)
    if not engine:
        return cpu_seconds(server_pid)
    used = [cpu_seconds(pid) for pid in engine]
    return sum(u for u in used if u is not None)
