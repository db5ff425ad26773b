"""`python3 -m vllm_dp_supervisor.healthcheck`: exit 0 if the supervisor on this host answers /live.

For a container's HEALTHCHECK: standard library only. It asks the port the supervisor really
listens on: read from the supervisor's own command line (`--supervisor-port`, or vLLM's spelling
`--data-parallel-supervisor-port`) and environment (SUPERVISOR_SUPERVISOR_PORT) in /proc, since a
HEALTHCHECK runs beside it and sees neither; the container's PID 1 first, else the first process
running the supervisor (under `docker run --init`); else this process's environment; else 9256.
Never changes anything: it reads /proc and sends one GET.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from vllm_dp_supervisor.settings import service_links

FLAGS = ("--supervisor-port", "--data-parallel-supervisor-port")
ENV = "SUPERVISOR_SUPERVISOR_PORT"
DEFAULT_PORT = "9256"


def port_in(argv: Sequence[str], environ: Mapping[str, str]) -> str | None:
    """The port a supervisor started with this argv and environment listens on (None: not said);
    the command line wins, as in the supervisor. Arguments after `--` are the ranks', not ours."""
    own = list(argv)[:list(argv).index("--")] if "--" in argv else list(argv)
    found = None
    for i, arg in enumerate(own):
        if arg in FLAGS and i + 1 < len(own):
            found = own[i + 1]
        elif arg.partition("=")[0] in FLAGS and "=" in arg:
            found = arg.partition("=")[2]
    if found is not None:
        return found
    value = environ.get(ENV)
    return None if value is None or service_links.injected({ENV: value}) else value  # as the supervisor reads it


def is_supervisor(argv: Sequence[str]) -> bool:
    if not argv or "vllm_dp_supervisor.healthcheck" in argv:
        return False
    if Path(argv[0]).name == "vllm-dp-supervisor":
        return True
    return "-m" in argv[:3] and "vllm_dp_supervisor" in argv[:4]


def _read(path: Path) -> list[str]:
    try:
        return [part.decode(errors="replace") for part in path.read_bytes().split(b"\0") if part]
    except OSError:  # gone, or not ours to read
        return []


def supervisor_port(proc: Path = Path("/proc"), environ: Mapping[str, str] = os.environ) -> str:
    pids = sorted((int(p.name) for p in proc.iterdir() if p.name.isdigit()), key=lambda pid: (pid != 1, pid)) \
        if proc.is_dir() else []
    for pid in pids:
        argv = _read(proc / str(pid) / "cmdline")
        if pid != os.getpid() and is_supervisor(argv):
            theirs = dict(item.partition("=")[::2] for item in _read(proc / str(pid) / "environ"))
            return port_in(argv, theirs) or environ.get(ENV) or DEFAULT_PORT
    return environ.get(ENV) or DEFAULT_PORT


def main() -> int:
    url = f"http://127.0.0.1:{supervisor_port()}/live"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if response.status == 200 else 1
    except urllib.error.HTTPError as exc:
        print(f"healthcheck: {url} answered {exc.code}", file=sys.stderr)
    except (urllib.error.URLError, OSError) as exc:
        print(f"healthcheck: {url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
