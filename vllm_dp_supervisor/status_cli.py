"""`vllm-dp-supervisor status`: a running supervisor's ranks as a table (or its /status as JSON).

Standard library only, so it answers in a few tens of milliseconds from a `kubectl exec`. Reads
the port and the admin token the way the supervisor does (SUPERVISOR_SUPERVISOR_PORT,
SUPERVISOR_ADMIN_TOKEN or SUPERVISOR_ADMIN_TOKEN_FILE): with the token, the last error of each
rank is shown too. Exit 0 when the pod is ready, 1 when it answers but is not ready, 2 on bad
usage, 3 when no supervisor answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from vllm_dp_supervisor.settings.config import ENV_PREFIX, PROG

READY, NOT_READY, USAGE, UNREACHABLE = 0, 1, 2, 3
COLUMNS = ("rank", "state", "pid", "port", "restarts", "inflight", "last error")


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{PROG} status", description="Show a running supervisor's ranks.",
                                     epilog="Exit codes: 0 ready, 1 not ready, 2 bad usage, 3 no supervisor answered.")
    parser.add_argument("--supervisor-port", type=int, default=int(environ.get(ENV_PREFIX + "SUPERVISOR_PORT", 9256)),
                        help="the supervisor's port (default 9256) [SUPERVISOR_SUPERVISOR_PORT]")
    parser.add_argument("--host", default="127.0.0.1", help="where the supervisor runs (default 127.0.0.1)")
    parser.add_argument("--json", action="store_true", help="print /status as JSON")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer (default 5)")
    return parser


def _token(environ: Mapping[str, str]) -> str | None:
    token = environ.get(ENV_PREFIX + "ADMIN_TOKEN")
    path = environ.get(ENV_PREFIX + "ADMIN_TOKEN_FILE")
    if not token and path:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError:
            token = None
    return token or None


def fetch(host: str, port: int, timeout: float, token: str | None) -> dict[str, Any]:
    host = f"[{host}]" if ":" in host else host
    request = urllib.request.Request(f"http://{host}:{port}/status")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def table(status: dict[str, Any]) -> str:
    rows = [[str(r["rank"]), r["state"], str(r["pid"] or "-"), str(r["port"]), str(r["restarts"]),
             "-" if r.get("inflight") is None else str(r["inflight"]), r.get("last_error") or "-"]
            for r in status["ranks"]]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(COLUMNS[:-1])]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS[:-1], widths, strict=True)) + "  " + COLUMNS[-1]]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1] for row in rows]
    head = (f"{'ready' if status['ready'] else 'not ready'}: {status['ready_ranks']} of {len(status['ranks'])} "
            f"rank(s) serving (needs {status['min_ready_ranks']}); supervisor {status['state']}")
    if status.get("stop_reason"):
        head += f" ({status['stop_reason']})"
    if str(status.get("rank_logs", "")).startswith("hidden"):
        lines.append("(last errors hidden: set SUPERVISOR_ADMIN_TOKEN or SUPERVISOR_ADMIN_TOKEN_FILE)")
    return head + "\n" + "\n".join(lines) + "\n"


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    try:
        args = _parser(environ).parse_args(list(argv))
    except SystemExit as exc:  # argparse: --help (0) or bad usage (2)
        return USAGE if exc.code else 0
    except ValueError as exc:  # a SUPERVISOR_SUPERVISOR_PORT that is no number
        print(f"{PROG} status: error: {exc}", file=sys.stderr)
        return USAGE
    try:
        status = fetch(args.host, args.supervisor_port, args.timeout, _token(environ))
    except urllib.error.HTTPError as exc:
        print(f"{PROG} status: {args.host}:{args.supervisor_port} answered HTTP {exc.code}", file=sys.stderr)
        return UNREACHABLE
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"{PROG} status: no supervisor answered on {args.host}:{args.supervisor_port}: {reason}",
              file=sys.stderr)
        return UNREACHABLE
    sys.stdout.write(json.dumps(status, indent=2) + "\n" if args.json else table(status))
    return READY if status.get("ready") else NOT_READY
