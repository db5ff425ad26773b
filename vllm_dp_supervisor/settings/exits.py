"""The supervisor's exit codes: what each means, in one table (the README's and `--help`'s), and
how a failed rank's own exit becomes the supervisor's, and a process's end said in words. Pure;
no imports of the package.

A rank's own code is passed through (1 for a Python error, 128+N for signal N, 137 often the OOM
killer), except where it would read as one of the supervisor's own verdicts: a rank's 2 (what
vLLM's argument parser exits with) is not "bad configuration, nothing started", and a rank's 3-5
is not "unhealthy", "not ready in time" or "exited 0". Those become RANK_RESERVED_CODE, and the
rank's own code stays in the exit summary and the termination message.
"""

from __future__ import annotations

import signal

REQUESTED = 0  # stopped on request: a signal, or POST /stop
RANK_FAILED = 1  # a rank's server exited with 1 (the code is the rank's own)
BAD_CONFIG = 2  # the command line or the environment was rejected: nothing started
UNHEALTHY = 3  # a rank failed its probes, hung, lost its port to another program, or failed to recover
NOT_READY = 4  # a rank was not ready within --startup-timeout
EXITED_ZERO = 5  # a rank's server ended by itself with 0 (vLLM's API server does when its engine dies)
RANK_RESERVED_CODE = 6  # a rank's server exited with 2-6, codes that would read as one of the above
CANNOT_START = 127  # a rank's command could not be started (not found, not executable), as a shell says

RESERVED = range(BAD_CONFIG, RANK_RESERVED_CODE + 1)

# (code, meaning): the README's table and --help are built from this.
TABLE: tuple[tuple[str, str], ...] = (
    (str(REQUESTED), "stopped on request (a signal, or POST /stop)"),
    ("N", "the first rank to fail exited by itself with N (1, or 7 and above; 1 is an error in the server)"),
    ("128+N", "the first rank to fail was killed by signal N (137: SIGKILL, often the OOM killer)"),
    (str(BAD_CONFIG), "bad configuration: the command line or the environment was rejected, nothing started"),
    (str(UNHEALTHY), "a rank was unhealthy: failed probes, a hung engine, its port answered by another "
                     "program, or a failed in-engine recovery"),
    (str(NOT_READY), "a rank was not ready within --startup-timeout"),
    (str(EXITED_ZERO), "a rank's server ended by itself with 0 (vLLM's API server does when its engine "
                       "dies: a server that ends on its own has failed)"),
    (str(RANK_RESERVED_CODE), "a rank's server exited with 2-6, which would read as one of the codes above "
                              "(vLLM exits 2 when it rejects its arguments); its own code is in the summary "
                              "and the termination message"),
    (str(CANNOT_START), "a rank's command could not be started"),
)


def of_rank_exit(code: int) -> int:
    """The supervisor's exit code when a rank that exited with `code` (128+N for signal N) ends
    the pod."""
    if code == 0:
        return EXITED_ZERO
    if code in RESERVED:
        return RANK_RESERVED_CODE
    return code


def describe_exit(returncode: int, oom_killed: bool | None = None) -> str:
    """A subprocess returncode as a sentence an operator understands. Out of memory is said only
    when the kernel's OOM killer is known to have killed (`oom_killed`): a SIGKILL from anyone
    else (a hung-process watchdog, an operator, kubelet's eviction) is not one."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    signum = -returncode
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    text = f"killed by {name}"
    if signum == signal.SIGKILL and oom_killed:
        text += " by the kernel's OOM killer (out of memory)"
    return text


def exit_code(returncode: int) -> int:
    """The shell convention: 128+N for death by signal N."""
    return returncode if returncode >= 0 else 128 - returncode
