"""How a line of vLLM's output is decorated, and where the text that says what it is begins.
Shared by rank_output.py (a failed rank's reason) and json_log.py (one record per traceback)."""

from __future__ import annotations

import re

# "ValueError: ...", "vllm.v1.engine.exceptions.EngineDeadError: ...", "SystemExit: 2", "KeyboardInterrupt"
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)(?::|$)")
# vLLM prefixes a child process's output with '(EngineCore pid=123) ' (or '(APIServer pid=1) ').
VLLM_PREFIX = re.compile(r"^\((?:[\w:.-]+) pid=\d+\)\s?")
# vLLM's log header: 'ERROR 11-22 15:21:26 [multiproc_executor.py:953] ' before the message.
VLLM_HEADER = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d [\d:.]+ \[[^\]]*\] ")
TRACEBACK = "Traceback (most recent call last)"


def bare(line: str) -> str:
    """The line without vLLM's process prefix and log header."""
    return VLLM_HEADER.sub("", VLLM_PREFIX.sub("", line))
