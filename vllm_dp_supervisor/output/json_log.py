"""`--log-format json`: one JSON object per line, with the field names log collectors pick up
without configuration.

`severity` and `message` are what GKE's agent reads (Loki and Elastic pipelines take them as they
are), `time` is RFC 3339 in UTC, `rank` is there when a line is about one rank. The supervisor's
own lines: {time, severity, message, rank?}, plus the fields a line carries as data (the SIGUSR1
status as an object, each row of the exit summary as fields); a rank's output lines: {time,
severity, rank, stream, message}. A rank line that is itself a JSON object (a rank started with
JSON logging) is merged, not quoted: its fields kept, its own level as `severity`, its message as
`message`, ours winning a clash. A Python traceback is one record, not forty: its lines are
gathered until the exception line (and any chained traceback after it) and sent as one message, so
a collector's error reporting sees the whole stack. Never raises, never waits: the caller's
console does the writing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable

from vllm_dp_supervisor.server.lines import (
    EXCEPTION_LINE,
    LEVEL_KEYS,
    MESSAGE_KEYS,
    TRACEBACK,
    bare,
    json_record,
    level_of,
    message_of,
)

_CHAIN = re.compile(r"^(?:During handling of the above exception|The above exception was the direct cause)")
QUIET_S = 0.2  # a traceback whose stream says nothing more for this long is sent as it is
MAX_LINES = 1000  # a longer traceback is sent in parts


def rfc3339(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """The supervisor's own lines. An exception's traceback goes into the message, one record. A
    record may carry `fields` (a dict: data, merged into the object) and `json_message` (its
    message in JSON, when the text one spells that data out)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        entry: dict[str, object] = {"time": rfc3339(record.created), "severity": record.levelname}
        if isinstance(fields, dict):
            entry.update((k, v) for k, v in fields.items() if k not in entry)
        rank = getattr(record, "rank", None)
        if rank is not None:
            entry["rank"] = rank
        message = getattr(record, "json_message", None) or record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        entry["message"] = message
        return json.dumps(entry)


def severity_of(line: str, stream: str) -> str:
    """The line's own level when it names one (vLLM's 'INFO 11-22 ...', uvicorn's 'INFO:', a JSON
    line's level field), else INFO on stdout and WARNING on stderr (where Python's warnings and
    errors go)."""
    return level_of(line) or ("INFO" if stream == "stdout" else "WARNING")


class RankJsonLines:
    """One rank stream's lines → JSON records, written with `write` (bytes, newline included)."""

    def __init__(self, rank: int, stream: str, write: Callable[[bytes], None]) -> None:
        self.rank = rank
        self.stream = stream
        self._write = write
        self._traceback: list[str] = []
        self._raised = False  # the traceback's exception line was seen: a chained one may follow
        self._timer: asyncio.TimerHandle | None = None

    def line(self, text: str) -> None:
        record = json_record(text)
        if record is not None:
            self.flush()
            self._send_merged(record, severity_of(text, self.stream))
            return
        said = bare(text)
        if self._traceback:
            if self._continues(said):
                self._traceback.append(text)
                if said.startswith(TRACEBACK):  # a chained traceback: its own exception line follows
                    self._raised = False
                elif EXCEPTION_LINE.match(said):
                    self._raised = True
                if len(self._traceback) >= MAX_LINES:
                    self.flush()
                else:
                    self._arm()
                return
            self.flush()
        if said.startswith(TRACEBACK):
            self._traceback, self._raised = [text], False
            self._arm()
            return
        self._send(text, severity_of(text, self.stream))

    def _continues(self, said: str) -> bool:
        if not said.strip() or _CHAIN.match(said) or said.startswith(TRACEBACK):
            return True  # the blank line and the sentence between chained tracebacks
        if self._raised:
            return said.startswith((" ", "\t"))  # an exception's own indented details (pydantic's)
        return said.startswith((" ", "\t")) or bool(EXCEPTION_LINE.match(said))

    def flush(self) -> None:
        """Send the traceback gathered so far (at a quiet stream, at the end of the stream)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._traceback:
            lines, self._traceback = self._traceback, []
            while lines and not lines[-1].strip():
                lines.pop()
            self._send("\n".join(lines), "ERROR")

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        try:
            self._timer = asyncio.get_running_loop().call_later(QUIET_S, self.flush)
        except RuntimeError:  # no loop (a unit test feeding lines): flushed by the next line or the end
            self._timer = None

    def _send_merged(self, fields: dict, severity: str) -> None:
        message = message_of(fields) or ""
        record: dict[str, object] = {"time": rfc3339(time.time()), "severity": severity, "rank": self.rank,
                                     "stream": self.stream}
        record.update((k, v) for k, v in fields.items()
                      if k not in record and k not in LEVEL_KEYS and k not in MESSAGE_KEYS)
        record["message"] = message
        self._write(json.dumps(record, default=str).encode() + b"\n")

    def _send(self, message: str, severity: str) -> None:
        record = {"time": rfc3339(time.time()), "severity": severity, "rank": self.rank,
                  "stream": self.stream, "message": message}
        self._write(json.dumps(record).encode() + b"\n")
