"""How a line of vLLM's output is decorated, where the text that says what it is begins, and the
level it names for itself. Shared by output/ranks.py (a failed rank's reason) and json_log.py
(one record per traceback, a rank's JSON line merged as fields). Pure."""

from __future__ import annotations

import json
import re
from typing import Any

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


# A line's own level word: vLLM's 'WARNING 11-22 ...', uvicorn's 'WARNING:  ', Python logging's
# 'WARNING:root:', '[WARNING] ...', a CLI's 'error: ...'.
_LEVEL_WORD = re.compile(r"^\[?(DEBUG|INFO|NOTICE|WARNING|WARN|ERROR|CRITICAL|FATAL)\b", re.I)
_LEVEL_NAMES = {"WARN": "WARNING", "FATAL": "CRITICAL", "NOTICE": "INFO", "TRACE": "DEBUG"}
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Where JSON loggers put the level and the message (python-json-logger, structlog, zap, GKE's).
LEVEL_KEYS = ("severity", "level", "levelname", "log.level")
MESSAGE_KEYS = ("message", "msg")


def json_record(line: str) -> dict[str, Any] | None:
    """The line as a JSON object, when it is one (a rank started with JSON logging); else None."""
    text = VLLM_PREFIX.sub("", line).strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _level_name(word: str) -> str | None:
    name = word.strip().upper()
    name = _LEVEL_NAMES.get(name, name)
    return name if name in LEVELS else None


def level_of(line: str) -> str | None:
    """The level the line names for itself (DEBUG, INFO, WARNING, ERROR, CRITICAL); None when it
    names none."""
    record = json_record(line)
    if record is not None:
        for key in LEVEL_KEYS:
            if isinstance(record.get(key), str):
                return _level_name(record[key])
        return None
    word = _LEVEL_WORD.match(VLLM_PREFIX.sub("", line).lstrip())
    return None if word is None else _level_name(word.group(1))


def message_of(record: dict[str, Any]) -> str | None:
    """A JSON log record's message."""
    for key in MESSAGE_KEYS:
        if isinstance(record.get(key), str):
            return str(record[key])
    return None
