"""The command line and the environment → one frozen `Config`. Pure: no sockets, no processes.

Every option reads `SUPERVISOR_<NAME>` from the environment too (pods are configured that way);
the command line wins over the environment, which wins over the default. Defaults are written
once, on `Config`; `--help` shows them from there. Every rule that can be checked without touching
the machine is checked here, so bad input fails before anything starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import shlex
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vllm_dp_supervisor.server.args import ServerArgsError, read_server_args
from vllm_dp_supervisor.settings import exits
from vllm_dp_supervisor.settings import parsers as p
from vllm_dp_supervisor.settings.checks import CHECKS
from vllm_dp_supervisor.settings.config import (
    ENV_PREFIX,
    MAX_BACKOFF_S,
    PROG,
    SHUTDOWN_MARGIN_S,
    Config,
    ConfigError,
    DeviceKind,
    LogFormat,
    Mode,
    RankLogs,
    RestartPolicy,
    RouterPolicy,
    package_version,
)


@dataclasses.dataclass(frozen=True)
class Option:
    flag: str
    parse: Callable[[str], Any]
    help: str
    metavar: str
    default_text: str | None = None  # what --help says when the default is not a plain value
    secret: bool = False  # never echoed in an error
    aliases: tuple[str, ...] = ()  # other spellings taken as well (vLLM's own, for the same thing)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()

    @property
    def default(self) -> str | None:
        """The default as --help and the README show it, from `Config` (None: no default to show)."""
        if self.default_text is not None:
            return self.default_text
        return show(CONFIG_DEFAULTS.get(self.dest))


CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)
                   if f.default is not dataclasses.MISSING}


def show(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return shlex.join(value)
    if isinstance(value, frozenset):
        return ",".join(map(str, sorted(value))) or "none"
    return str(value)


OPTIONS: tuple[Option, ...] = (
    Option("--dp-size-local", p.positive_int, "ranks (vLLM servers) on this node; required", "N",
           aliases=("--data-parallel-size-local", "-dpl")),
    Option("--port", p.port, "first rank's port; rank i listens on PORT+i", "PORT"),
    Option("--supervisor-port", p.port, "port of /live /ready /status", "PORT",
           aliases=("--data-parallel-supervisor-port",)),
    Option("--host", p.host, "address the ranks listen on", "HOST"),
    Option("--supervisor-host", p.host, "address of the supervisor API", "HOST", "--host"),
    Option("--server-cmd", p.command,
           "command that starts one server, split like a shell would, run without one", "CMD"),
    Option("--mode", p.choice(Mode),
           "replicas: independent servers (dense models); dp: MoE external data-parallel ranks", "MODE"),
    Option("--data-parallel-size", p.positive_int, "dp mode: global DP size", "N", "--dp-size-local",
           aliases=("-dp",)),
    Option("--data-parallel-start-rank", p.non_negative_int, "dp mode: DP rank of local rank 0", "N",
           aliases=("-dpr",)),
    Option("--node-rank", p.non_negative_int,
           "dp mode: this node's index; sets --data-parallel-start-rank to N x --dp-size-local "
           "(for a StatefulSet's pod index)", "N"),
    Option("--data-parallel-address", p.host, "dp mode: address of DP rank 0", "HOST", aliases=("-dpa",)),
    Option("--data-parallel-rpc-port", p.port, "dp mode: DP RPC port (vLLM's own default)", "PORT",
           aliases=("-dpp",)),
    Option("--device", p.choice(DeviceKind),
           "cuda: ranks get CUDA_VISIBLE_DEVICES; cpu: ranks get their own cores (shared round "
           "robin when there are fewer cores than ranks); none: no device assignment at all; "
           "auto: cuda when a GPU is visible", "KIND"),
    Option("--devices", p.devices,
           "GPU indexes to use, relative to the supervisor's CUDA_VISIBLE_DEVICES", "LIST", "all visible"),
    Option("--probe-interval", p.seconds, "seconds between /health probes of a ready rank", "S"),
    Option("--probe-timeout", p.seconds, "seconds before a probe counts as failed", "S"),
    Option("--startup-probe-interval", p.seconds, "seconds between probes while a rank starts", "S"),
    Option("--failure-threshold", p.positive_int,
           "consecutive failed probes that make a ready rank unhealthy", "N"),
    Option("--startup-timeout", p.seconds, "seconds a rank may take to become ready", "S"),
    Option("--progress-interval", p.seconds,
           "while a rank starts, log a line with its latest output this often", "S"),
    Option("--stop-timeout", p.seconds,
           "seconds ranks get after the forwarded signal before every process of their trees is "
           f"SIGKILLed; at least the child's --shutdown-timeout + {SHUTDOWN_MARGIN_S:g}", "S"),
    Option("--drain-timeout", p.seconds,
           "a planned stop of a rank (an operator's restart, a rollout, a hung or unhealthy rank's "
           "replacement) waits this long for its requests, then its streams continue on other ranks "
           "(see docs: Router)", "S", "the stop budget (--stop-timeout)"),
    Option("--log-level", p.log_level, "debug, info, warning or error", "LEVEL"),
    Option("--log-format", p.choice(LogFormat),
           "text, or json: one JSON object per line, {time, severity, message, rank} for the "
           "supervisor's own lines and {time, severity, rank, stream, message} for rank output, a "
           "traceback in one record", "FMT"),
    Option("--log-dir", str,
           "rank output is written to DIR/<run-id>/attempt_<k>/rank_<i>/{stdout,stderr}.log; "
           "'none' keeps nothing on disk", "DIR", "under the system temp dir"),
    Option("--run-id", p.run_id, "name of this run's log directory", "ID", "a timestamp"),
    Option("--tee", p.tee, "ranks whose output is copied to stdout as '[rank<i>] ' lines: all, none "
           "or a list such as 0,2", "WHICH", "all"),
    Option("--log-max-bytes", p.size, "size at which a rank's log file rotates to .1, e.g. 100M", "SIZE",
           "100M"),
    Option("--restart-policy", p.choice(RestartPolicy),
           "never: a failed rank stops the pod; on-failure: restart it unless its exit code is in "
           "--no-restart-exit-codes; always: restart it whatever the code", "POLICY"),
    Option("--max-restarts", p.non_negative_int,
           "restarts of one rank (of the group, in dp mode) within --restart-window", "N"),
    Option("--restart-window", p.seconds, "seconds over which --max-restarts counts", "S"),
    Option("--restart-backoff", p.seconds,
           f"first delay before a restart, doubling each time up to {MAX_BACKOFF_S:g} s, with jitter", "S"),
    Option("--stable-after", p.seconds, "seconds ready after which a rank's backoff resets", "S"),
    Option("--no-restart-exit-codes", p.exit_codes,
           "exit codes never retried under on-failure, comma-separated, or none", "LIST"),
    Option("--deep-probe-interval", p.seconds_or_off,
           "seconds between one-token completions sent to each ready rank that is not visibly "
           "busy, to catch an engine hung behind a healthy /health; 0 turns it off", "S"),
    Option("--deep-probe-timeout", p.seconds, "seconds a deep probe may take", "S"),
    Option("--ft-recovery-timeout", p.seconds,
           "with vLLM's --enable-fault-tolerance: seconds a faulted group gets to recover after the "
           "supervisor's retry before it is restarted instead (under vLLM's own 120)", "S"),
    Option("--router-port", p.port_or_none,
           "the pod's one OpenAI-compatible port, routing to the ready ranks; none: no router", "PORT"),
    Option("--router-host", p.host, "address the router listens on", "HOST", "--host"),
    Option("--router-workers", p.positive_int, "router worker processes, sharing the port", "N"),
    Option("--router-policy", p.choice(RouterPolicy),
           "least-requests: the rank with the fewest requests in flight (ties at random); "
           "round-robin: in turn; prefix: prompts that start alike go to the same rank (its prefix "
           "cache hits), within --router-load-bound; session: the same for one session "
           "(--router-session-header, or the body's user); cache: the rank whose KV cache holds the "
           "longest part of the prompt, as vLLM's own KV events say, weighed against load "
           "(--router-cache-weight), within --router-load-bound", "POLICY"),
    Option("--router-prefix-chars", p.positive_int,
           "prefix policy: how many leading characters of the prompt (of a chat: its messages in "
           "order) place it", "K"),
    Option("--router-session-header", p.header_name, "session policy: the header naming a session", "NAME"),
    Option("--router-cache-weight", p.weight,
           "cache policy: what a rank holding the whole prompt is worth against one at the load bound; "
           "a rank holding a share of the prompt more than 1/W larger than another's wins over it "
           "whatever their loads; 0: least-requests within the bound", "W"),
    Option("--kv-events-port", p.port,
           "cache policy, dp mode: the ranks publish their KV events on this port plus their global "
           "rank, replays after the data-parallel size (replicas mode uses Unix sockets)", "PORT"),
    Option("--router-load-bound", p.load_bound,
           "prefix, session and cache policies: a rank that one more request would put above F x the mean "
           "in-flight count is passed over for the next choice", "F"),
    Option("--router-queue-timeout", p.seconds,
           "seconds a request waits for a ready rank before a 503 with Retry-After", "S"),
    Option("--router-retries", p.non_negative_int,
           "times a request that no rank answered is sent to another rank (see README: Router)", "N"),
    Option("--router-max-body", p.size, "largest request body the router takes (413 beyond)", "SIZE", "16M"),
    Option("--stall-timeout", p.seconds_or_off,
           "seconds a ready rank may hold requests from the router and send nothing back before it "
           "is judged by what its engine does: no CPU used for 0.2 s, out of rotation; stopped "
           "(SIGSTOP) for 3.5 s, hung; busy (a long prefill) it stays; 0 turns it off", "S"),
    Option("--hang-timeout", p.seconds,
           "seconds a rank judged after a stall may go without producing anything (no token "
           "counted, no one-token completion answered) before it is declared hung, busy or idle: "
           "a collective stuck spinning looks busy, a deadlock idle; raise it above your longest "
           "prefill or first compile", "S"),
    Option("--router-settle", p.seconds_or_off,
           "at a stop, seconds the router keeps serving after /ready turns 503, while load "
           "balancers take the pod out", "S"),
    Option("--min-ready-ranks", p.positive_int, "/ready is 200 while at least K ranks are ready", "K",
           "half, rounded up; all in dp mode"),
    Option("--admin-token", p.token, "enables POST /drain, /undrain, /stop, /rollout, /ranks/<i>/restart for "
           "'Authorization: Bearer <token>' (prefer the env variable or a file)", "TOKEN", secret=True),
    Option("--admin-token-file", str, "file holding the admin token (a mounted Kubernetes secret)", "PATH"),
    Option("--show-rank-logs", p.choice(RankLogs),
           "who reads the ranks' log lines (last_line, log_tail, last_error) on /status and /events: "
           "admin: requests with the admin token; all: anyone who reaches --supervisor-port (they "
           "can hold client addresses, and prompts when vLLM logs requests)", "WHO"),
    Option("--otlp-traces-endpoint", p.otlp_endpoint,
           "OpenTelemetry: the router sends a span per request to this OTLP collector (gRPC, or "
           "HTTP/protobuf with OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, as vLLM reads it), and each rank "
           "gets the same flag unless its arguments have one; needs the [otel] extra", "URL", secret=True),
    Option("--termination-log", str,
           "file the exit code and its reason are written to when the supervisor exits (what "
           "`kubectl describe pod` shows); 'none': no file", "PATH",
           "/dev/termination-log if it exists"),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own errors: one line, no usage dump
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        usage=f"{PROG} --dp-size-local N [options] [-- SERVER ARGS...]\n"
              f"       {PROG} status [--supervisor-port S] [--host H] [--json]\n"
              f"       {PROG} check-manifests FILE|DIR|-",
        description="Start one vLLM OpenAI-compatible server per local rank, probe their /health, "
                    "serve /live, /ready and /status, route OpenAI requests on --router-port to "
                    "the ready ranks, and stop every process of every rank on SIGTERM or when a "
                    "rank fails.",
        epilog="Every option can also be set with the environment variable shown in brackets; the "
               "command line wins. Arguments after -- go to every rank's server unchanged (the model "
               "first, for vLLM), followed by --host and --port (and the data-parallel flags in dp mode).\n"
               "Exit codes:\n" + "\n".join(f"  {code:>5}  {meaning}" for code, meaning in exits.TABLE),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    for opt in OPTIONS:
        default = f" (default {opt.default})" if opt.default is not None else ""
        parser.add_argument(opt.flag, *opt.aliases, dest=opt.dest, metavar=opt.metavar, default=None,
                            help=f"{opt.help}{default} [{opt.env}]")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything, print what would start (per rank: port, devices, argv and the "
                             "environment it adds, secrets redacted; JSON with --log-format json), start nothing")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    return parser


def split_child_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Our options before the first `--`, the servers' arguments after it."""
    argv = list(argv)
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


def parse_config(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """Parse and validate. Raises ConfigError with a one-line message."""
    own, child = split_child_args(argv)
    ns, extra = build_parser().parse_known_args(own)
    if extra:
        raise ConfigError(f"unrecognized arguments: {' '.join(extra)} "
                          "(arguments for the server go after --, e.g. -- MODEL --max-model-len 4096)")
    values = _values(ns, environ)
    explicit = set(values)
    if "dp_size_local" not in values:
        raise ConfigError(f"--dp-size-local is required (or {ENV_PREFIX}DP_SIZE_LOCAL)")
    if "node_rank" in values:
        if "data_parallel_start_rank" in values:
            raise ConfigError("give --node-rank or --data-parallel-start-rank, not both")
        values["data_parallel_start_rank"] = values["node_rank"] * values["dp_size_local"]
    values["child_args"] = tuple(child)
    try:
        # the ranks' environment: VLLM_API_KEY there is a key the probes must send
        values["server"] = read_server_args(child, environ)
    except ServerArgsError as exc:
        raise ConfigError(str(exc)) from None
    config = Config(**values)
    for check in CHECKS:
        check(config, explicit)
    return config


def _values(ns: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
    """The options given, on the command line or else in the environment, parsed."""
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        raw, source = getattr(ns, opt.dest), opt.flag
        if raw is None and opt.env in environ:
            raw, source = environ[opt.env], opt.env
        if raw is None:
            continue
        try:
            values[opt.dest] = opt.parse(raw)
        except ValueError as exc:
            reason = str(exc) if not str(exc).startswith(("invalid literal", "could not convert")) \
                else "must be a number"
            shown = source if opt.secret else f"{source}={raw!r}"
            raise ConfigError(f"{shown}: {reason}") from None
    return values
