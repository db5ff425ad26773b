"""settings/exits.py: a process's end in words and as a shell code. Pure."""

from __future__ import annotations

import signal

import pytest

from vllm_dp_supervisor.settings.exits import describe_exit, exit_code


@pytest.mark.parametrize("returncode,text,code", [
    (0, "exited with code 0", 0), (3, "exited with code 3", 3),
    (-signal.SIGKILL, "killed by SIGKILL (out of memory?)", 137),
    (-signal.SIGSEGV, "killed by SIGSEGV", 139), (-signal.SIGTERM, "killed by SIGTERM", 143),
])
def test_exit_descriptions_and_codes(returncode, text, code):
    assert describe_exit(returncode) == text
    assert exit_code(returncode) == code
