"""settings/exits.py: a process's end in words and as a shell code. Pure."""

from __future__ import annotations

import signal

import pytest

from vllm_dp_supervisor.settings.exits import describe_exit, exit_code


@pytest.mark.parametrize("returncode,text,code", [
    (0, "exited with code 0", 0), (3, "exited with code 3", 3),
    (-signal.SIGKILL, "killed by SIGKILL", 137),
    (-signal.SIGSEGV, "killed by SIGSEGV", 139), (-signal.SIGTERM, "killed by SIGTERM", 143),
])
def test_exit_descriptions_and_codes(returncode, text, code):
    assert describe_exit(returncode) == text
    assert exit_code(returncode) == code


def test_out_of_memory_is_said_only_when_the_oom_killer_did_it():
    assert describe_exit(-signal.SIGKILL, oom_killed=True) == (
        "killed by SIGKILL by the kernel's OOM killer (out of memory)")
    assert describe_exit(-signal.SIGKILL, oom_killed=False) == "killed by SIGKILL"
    assert describe_exit(-signal.SIGKILL, oom_killed=None) == "killed by SIGKILL"  # unknown: no guess
    assert describe_exit(-signal.SIGTERM, oom_killed=True) == "killed by SIGTERM"
