"""Rank output: read from pipes on the event loop, teed to the console as whole `[rank<i>] ` lines.

A rank never blocks on a full pipe: the loop drains its pipes as fast as they fill, and console
writes happen on one writer thread behind a bounded queue, so a slow or stuck console drops
lines (and says how many) instead of stalling the ranks or the probes. The last lines of each
rank's stderr are kept to say why it failed.
"""

from __future__ import annotations

import asyncio
import collections
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable

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


class RankOutput:
    """One rank's stdout and stderr: teed, with the tail kept."""

    def __init__(self, rank: int, console: Console | None, on_line: Callable[[str, str], None] | None = None) -> None:
        self.rank = rank
        self._console = console
        self._prefix = f"[rank{rank}] ".encode()
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.last_line: str | None = None
        self._on_line = on_line

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
        if pending:
            self._emit(pending, name)

    def _emit(self, raw: bytes, name: str) -> None:
        raw = raw.rstrip(b"\r")
        if self._console is not None:
            self._console.write_line(self._prefix + raw + b"\n")
        text = raw.decode("utf-8", errors="replace")
        if text.strip():
            self.last_line = text
        if name == "stderr":
            self.stderr_tail.append(text)
        if self._on_line is not None:
            self._on_line(name, text)

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
