"""Rank output and the supervisor's own log lines.

Rank output is read from pipes on the event loop and written, every line, to
LOG_DIR/<run-id>/attempt_<k>/rank_<i>/{stdout,stderr}.log (torchelastic's layout, without its
tail-a-file polling), and teed to the console as whole `[rank<i>] ` lines. A rank never blocks on
a full pipe: the loop drains its pipes as fast as they fill, and console writes happen on one
writer thread behind a bounded queue, so a slow or stuck console drops lines (and says how many)
instead of stalling the ranks or the probes; the files still get every byte. The last lines of
each rank's stderr are kept to say why it failed.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import queue
import re
import sys
import threading
import time
from pathlib import Path

MAX_LINE = 64 * 1024  # longer lines are split, never dropped
TAIL_LINES = 50
CONSOLE_QUEUE = 10_000  # lines buffered for a slow console before lines are dropped from it

# "ValueError: ...", "vllm.v1.engine.exceptions.EngineDeadError: ...", "SystemExit: 2", "KeyboardInterrupt"
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)(?::|$)")


class Console:
    """Whole lines to a file descriptor, from one thread, never blocking the caller."""

    def __init__(self, fd: int | None = None) -> None:
        self._fd = sys.stdout.fileno() if fd is None else fd
        self._queue: queue.Queue[bytes | None] = queue.Queue(CONSOLE_QUEUE)
        self._dropped = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="console", daemon=True)
        self._thread.start()

    def write_line(self, line: bytes) -> None:
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            with self._lock:
                self._dropped += 1

    def _run(self) -> None:
        while True:
            line = self._queue.get()
            if line is None:
                return
            with self._lock:
                dropped, self._dropped = self._dropped, 0
            if dropped:
                self._write(f"[supervisor] console too slow: {dropped} rank output line(s) not shown\n".encode())
            self._write(line)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except InterruptedError:
                continue
            except OSError:
                return  # console gone (closed pipe): rank output still goes to the tail buffers
            view = view[n:]

    def close(self, timeout: float = 2.0) -> None:
        """Flush what is queued, for at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
                break
            except queue.Full:
                if time.monotonic() >= deadline:
                    return
        self._thread.join(max(0.0, deadline - time.monotonic()))


class RotatingFile:
    """An append-only file that moves to `<name>.1` when it would pass `max_bytes`."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self._max = max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "ab")
        self._size = self._file.tell()

    def write(self, data: bytes) -> None:
        if self._size and self._size + len(data) > self._max:
            self._file.close()
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self._file = open(self.path, "ab")
            self._size = 0
        self._file.write(data)
        self._size += len(data)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def rank_log_dir(run_log_dir: Path, rank: int, attempt: int = 0) -> Path:
    return run_log_dir / f"attempt_{attempt}" / f"rank_{rank}"


class RankOutput:
    """One rank's stdout and stderr: written to its files, teed, with the tail kept."""

    def __init__(self, rank: int, console: Console | None, *, log_dir: Path | None = None,
                 max_bytes: int = 100 << 20, json_console: bool = False) -> None:
        self.rank = rank
        self._console = console
        self._json = json_console
        self._prefix = f"[rank{rank}] ".encode()
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.last_line: str | None = None
        self.log_dir = log_dir
        self._files = {} if log_dir is None else {
            name: RotatingFile(log_dir / f"{name}.log", max_bytes) for name in ("stdout", "stderr")}

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    async def pump(self, stream: asyncio.StreamReader, name: str) -> None:
        """Read until end of file. A last line without a newline is still emitted whole."""
        pending = b""
        while True:
            chunk = await stream.read(MAX_LINE)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._emit(line, name)
            while len(pending) >= MAX_LINE:
                self._emit(pending[:MAX_LINE], name)
                pending = pending[MAX_LINE:]
            if name in self._files:
                self._files[name].flush()  # once a chunk: an operator's `tail -f` sees it at once
        if pending:
            self._emit(pending, name)
        if name in self._files:
            self._files[name].flush()

    def _emit(self, raw: bytes, name: str) -> None:
        raw = raw.rstrip(b"\r")
        if name in self._files:
            self._files[name].write(raw + b"\n")
        text = raw.decode("utf-8", errors="replace")
        if self._console is not None:
            if self._json:
                line = json.dumps({"rank": self.rank, "stream": name, "line": text}).encode() + b"\n"
            else:
                line = self._prefix + raw + b"\n"
            self._console.write_line(line)
        if text.strip():
            self.last_line = text
        if name == "stderr":
            self.stderr_tail.append(text)

    def last_error(self) -> str | None:
        """The final exception line of the last traceback in stderr, else its last non-empty line."""
        lines = [_strip_log_prefix(l) for l in self.stderr_tail if l.strip()]
        if not lines:
            return None
        for i in range(len(lines) - 1, -1, -1):
            if lines[i].startswith("Traceback (most recent call last)"):
                raised = [l for l in lines[i + 1:] if _EXCEPTION_LINE.match(l)]
                if raised:
                    return raised[-1]
                break
        return lines[-1]


_VLLM_PREFIX = re.compile(r"^\((?:[\w:]+) pid=\d+\)\s*")


def _strip_log_prefix(line: str) -> str:
    """vLLM prefixes child process output with '(EngineCore pid=123) '."""
    return _VLLM_PREFIX.sub("", line).strip()


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, rank (when the record is about one), msg."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z", "level": record.levelname.lower()}
        rank = getattr(record, "rank", None)
        if rank is not None:
            entry["rank"] = rank
        entry["msg"] = record.getMessage()
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)
