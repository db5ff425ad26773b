"""One rank's stdout and stderr: read from pipes, written to files, teed, and its tail kept.

Output is read on the event loop and written, every line, to
LOG_DIR/<run-id>/attempt_<k>/rank_<i>/{stdout,stderr}.log (torchelastic's layout, without its
tail-a-file polling), and teed to the console as whole `[rank<i>] ` lines. The pipes are always
read, whatever happens to the files: a rank blocked on a full pipe is a frozen API server. So a
file that cannot be written (a full disk) is said once, retried every RETRY_S, and never stops
the tee or the kept tail; and nothing here raises into the supervisor's run.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from vllm_dp_supervisor.output.console import Console
from vllm_dp_supervisor.output.json_log import RankJsonLines
from vllm_dp_supervisor.server.lines import (
    EXCEPTION_LINE,
    TRACEBACK,
    VLLM_HEADER,
    VLLM_PREFIX,
    json_record,
    level_of,
    message_of,
)

MAX_LINE = 64 * 1024  # longer lines are split, never dropped
TAIL_LINES = 50
# Lines of both streams kept to find why a rank failed: vLLM logs to stdout (a worker's ERROR
# traceback with the root cause), while the final re-raise goes to stderr.
RECENT_LINES = 200
RETRY_S = 10.0  # a log file that failed is tried again this long after

log = logging.getLogger("supervisor")

# vLLM's re-raises that point at the real cause ("Engine core initialization failed. See root cause
# above", EngineDeadError's "See stack trace (above) for the root cause").
_ROOT_CAUSE_ELSEWHERE = re.compile(r"root cause (?:above|below)|See stack trace for root cause|"
                                   r"See stack trace \(above\) for the root cause", re.I)
# Said when such a re-raise has no cause above it: the engine left no traceback of its own.
NO_CAUSE_ABOVE = ("; no traceback above it: its engine process ended without one (a signal: SIGKILL, the OOM "
                  "killer, or a crash)")
# A line that names no level is taken as an error only if it says so in words (argparse's
# 'vllm: error: ...', a wrapper's 'fatal: ...'): a progress bar or a banner is none.
_ERROR_WORDS = re.compile(r"\b(?:error|fatal|fail(?:ed|ure|s)?|exception|abort(?:ed)?|dead|killed|denied|"
                          r"refused|cannot|can't|unable|invalid|panic|crash(?:ed|ing|es)?|"
                          r"segmentation fault|out of memory)\b", re.I)
ERROR_LEVELS = frozenset({"ERROR", "CRITICAL"})


class LogFile:
    """An append-only file that moves to `<name>.1` past `max_bytes`, and never raises.

    On a write error (ENOSPC, EIO, the directory gone) it logs one line with the path and errno,
    counts the lines it could not write, and tries again RETRY_S later; once it can, it logs that
    and writes a line into the file saying how many lines are missing there.
    """

    def __init__(self, path: Path, max_bytes: int, rank: int, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._max = max_bytes
        self._rank = rank
        self._monotonic = monotonic
        self._fd: int | None = None
        self._size = 0
        self._retry_at = 0.0
        self._lost = 0  # lines not written since the last failure
        self._failure: OSError | None = None
        self._open()

    def _open(self) -> bool:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._size = os.fstat(self._fd).st_size
            return True
        except OSError as exc:
            self._failed(exc)
            return False

    def write(self, data: bytes, lines: int = 1) -> None:
        """`data`: whole lines, `lines` of them. Written at once unless they cross `max_bytes`."""
        if lines > 1 and self._size + len(data) > self._max:
            for line in data.splitlines(keepends=True):  # rotate at a line boundary
                self.write(line)
            return
        if self._fd is None and (self._monotonic() < self._retry_at or not self._open()):
            self._lost += lines
            return
        try:
            if self._failure is not None:
                self._recovered()
            if self._size and self._size + len(data) > self._max:
                self._rotate()
            self._write_all(data)
        except OSError as exc:
            self._lost += lines
            self._failed(exc)

    def _write_all(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            self._size += n
            view = view[n:]

    def _rotate(self) -> None:
        self.close()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        if not self._open():
            raise self._failure or OSError(errno.EIO, "cannot reopen")

    def _failed(self, exc: OSError) -> None:
        first = self._failure is None
        self._failure = exc
        self.close()
        self._retry_at = self._monotonic() + RETRY_S
        if first:
            log.error("rank %d: cannot write %s: [Errno %s] %s; its output still reaches the console and "
                      "/status; trying again every %g s", self._rank, self.path, exc.errno,
                      exc.strerror or exc, RETRY_S, extra={"rank": self._rank})

    def _recovered(self) -> None:
        lost, why = self._lost, self._failure
        self._failure, self._lost = None, 0
        log.info("rank %d: writing %s again; %d line(s) could not be written there", self._rank,
                 self.path, lost, extra={"rank": self._rank})
        self._write_all(f"[vllm-dp-supervisor] {lost} line(s) missing here: "
                        f"{getattr(why, 'strerror', None) or why}\n".encode())

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass


def rank_log_dir(run_log_dir: Path, rank: int, attempt: int = 0) -> Path:
    return run_log_dir / f"attempt_{attempt}" / f"rank_{rank}"


class RankOutput:
    """One rank's stdout and stderr: written to its files, teed, with the tail kept."""

    def __init__(self, rank: int, console: Console | None, *, log_dir: Path | None = None,
                 max_bytes: int = 100 << 20, json_console: bool = False) -> None:
        self.rank = rank
        self._console = console
        self._json = {name: RankJsonLines(rank, name, console.write_line) for name in ("stdout", "stderr")} \
            if json_console and console is not None else None
        self._prefix = f"[rank{rank}] ".encode()
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._recent: collections.deque[str] = collections.deque(maxlen=RECENT_LINES)
        self.last_line: str | None = None
        self.lines_seen = 0  # lines written so far (a start that makes no progress writes none)
        self.log_dir = log_dir
        self._files = {} if log_dir is None else {
            name: LogFile(log_dir / f"{name}.log", max_bytes, rank) for name in ("stdout", "stderr")}

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
            while len(pending) >= MAX_LINE:
                lines.append(pending[:MAX_LINE])
                pending = pending[MAX_LINE:]
            self._emit(lines, name)
            if b"\r" in pending:  # a progress bar redrawing itself: its latest state is news
                self._note_last_line(pending)
        if pending:
            self._emit([pending], name)
        if self._json is not None:
            self._json[name].flush()

    def _emit(self, raws: list[bytes], name: str) -> None:
        """Lines of one chunk: one write to the file (a syscall a chunk, not a line)."""
        if not raws:
            return
        raws = [raw.rstrip(b"\r") for raw in raws]
        self.lines_seen += len(raws)
        if name in self._files:
            self._files[name].write(b"".join(raw + b"\n" for raw in raws), len(raws))
        for raw in raws:
            text = raw.decode("utf-8", errors="replace")
            if self._json is not None:
                self._json[name].line(text)
            elif self._console is not None:
                self._console.write_line(self._prefix + raw + b"\n")
            self._note_last_line(raw)
            self._recent.append(text)
            if name == "stderr":
                self.stderr_tail.append(text)

    def _note_last_line(self, raw: bytes) -> None:
        """`\r` ends a line for this purpose: tqdm redraws its bar with `\r` and no newline for the
        whole weight load, and the last state is what an operator wants to see."""
        for part in reversed(raw.split(b"\r")):
            text = part.decode("utf-8", errors="replace")
            if text.strip():
                self.last_line = text
                return

    def last_error(self) -> str | None:
        return last_error(self._recent)


def last_error(output_lines: Iterable[str]) -> str | None:
    """Why a rank failed, from its last output lines (both streams): the final exception of the last traceback
    (with the line after it when that is where the reason is, as in pydantic's errors), else the
    last line at ERROR or above (a JSON line's own level and message included), or naming no
    level but saying it failed. Never a WARNING, INFO or DEBUG line. None when nothing is an error.

    vLLM re-raises a child's failure as 'RuntimeError: Engine core initialization failed. See
    root cause above': then the root cause, an earlier exception line, is what is returned."""
    said = [VLLM_PREFIX.sub("", line.rstrip()) for line in output_lines if line.strip()]
    lines = [VLLM_HEADER.sub("", line) for line in said]  # the message of each log line
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].lstrip().startswith(TRACEBACK):
            raised = [j for j in range(i + 1, len(lines)) if EXCEPTION_LINE.match(lines[j])]
            if raised:
                if _ROOT_CAUSE_ELSEWHERE.search(lines[raised[-1]]):
                    causes = [j for j in range(raised[-1]) if EXCEPTION_LINE.match(lines[j])
                              and not _ROOT_CAUSE_ELSEWHERE.search(lines[j])]
                    if causes:
                        return _with_reason(lines, causes[-1])
                    return _with_reason(lines, raised[-1]) + NO_CAUSE_ABOVE
                return _with_reason(lines, raised[-1])
            break
    for line in reversed(said):
        level = level_of(line)
        if level in ERROR_LEVELS:
            record = json_record(line)
            return line.strip() if record is None else (message_of(record) or line.strip())
        if level is None and _ERROR_WORDS.search(line):
            return line.strip()
    return None


def _with_reason(lines: list[str], at: int) -> str:
    """'ValidationError: 1 validation error for ModelConfig' says nothing by itself: the indented
    line after it ('  Value error, User-specified max_model_len ...') is the reason."""
    text = lines[at].strip()
    for follow in lines[at + 1:at + 3]:
        if not follow.startswith((" ", "\t")):
            break
        reason = follow.strip()
        if reason and not reason.startswith("For further information"):
            return f"{text}: {reason}"
    return text
