"""The termination-message file: why the supervisor exited, where Kubernetes looks for it.

The kubelet shows the file's content as the container's last state in `kubectl describe pod`
(`terminationMessagePath`, /dev/termination-log by default). Written once, at exit, and best
effort: a file that cannot be written costs one log line, never the exit code.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

from vllm_dp_supervisor.settings.config import DEFAULT_TERMINATION_LOG, ENV_PREFIX, NO_FILE

log = logging.getLogger("supervisor")
MAX_BYTES = 4096  # the kubelet keeps no more of it
FLAG = "--termination-log"
ENV = ENV_PREFIX + "TERMINATION_LOG"


def path_of(option: str | None) -> str | None:
    """The file to write: the option's, or /dev/termination-log when it exists; None for none."""
    if option is None:
        return DEFAULT_TERMINATION_LOG if os.path.exists(DEFAULT_TERMINATION_LOG) else None
    return None if option == NO_FILE else option


def option_before_parsing(argv: Sequence[str], environ: Mapping[str, str], flag: str = FLAG,
                          env: str = ENV) -> str | None:
    """An option as given (--termination-log by default), read without the parser: for a command
    line the parser rejected (bad configuration ends the pod too, and the message should say why,
    in the log format asked for)."""
    own = list(argv)[:list(argv).index("--")] if "--" in argv else list(argv)
    for i, arg in enumerate(own):
        if arg == flag and i + 1 < len(own):
            return own[i + 1]
        if arg.startswith(flag + "="):
            return arg.partition("=")[2]
    return environ.get(env)


def write(path: str | None, text: str) -> None:
    if path is None:
        return
    data = text.encode(errors="replace")
    if len(data) > MAX_BYTES:
        data = data[:MAX_BYTES - 4].decode(errors="ignore").encode() + b"...\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("could not write the termination message to %s: %s", path, exc.strerror or exc)
