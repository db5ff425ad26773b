"""The supervisor's two outputs, stdout (the ranks' tee) and stderr (its own log lines), written
so that the event loop never waits for them.

A stuck reader (a log collector that stopped, a `kubectl logs` pipe nobody drains) must not stop
signals, probes or /ready: every line goes through a bounded queue to one writer thread per
stream. When the queue is full, lines are dropped and counted, and the count is written as soon
as the stream moves again. Nothing here ever raises into the caller.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time

QUEUE_LINES = 10_000  # lines buffered for a slow stream before lines are dropped


class Console:
    """Whole lines to a file descriptor, from one thread, never blocking the caller."""

    def __init__(self, fd: int | None = None, what: str = "rank output") -> None:
        self._fd = sys.stdout.fileno() if fd is None else fd
        self._what = what
        self._queue: queue.Queue[bytes | None] = queue.Queue(QUEUE_LINES)
        self._dropped = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"console-{self._fd}", daemon=True)
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
                self._write(f"[supervisor] output too slow: {dropped} {self._what} line(s) not shown\n".encode())
            self._write(line)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except InterruptedError:
                continue
            except OSError:
                return  # stream gone (closed pipe): nothing else to do with the line
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


class ConsoleHandler(logging.Handler):
    """A logging handler that formats on the caller's thread and writes through a `Console`:
    logging from the event loop costs a format and a queue put, never a write."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.write_line(self.format(record).encode(errors="replace") + b"\n")
        except Exception:
            self.handleError(record)

