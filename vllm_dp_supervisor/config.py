"""Command line and environment → one frozen `Config`. Pure: no sockets, no files, no processes.

Every option reads `SUPERVISOR_<NAME>` from the environment too (pods are configured that way);
the command line wins over the environment, which wins over the default. Every rule that can be
checked without touching the machine is checked here, so bad input fails before anything starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import math
import shlex
from collections.abc import Mapping, Sequence
from typing import Any, Callable

from .restarts import RestartPolicy, RestartRules
from .vllm_args import ServerArgs, ServerArgsError, read_server_args

PROG = "vllm-dp-supervisor"
ENV_PREFIX = "SUPERVISOR_"
# vLLM 0.32's own default for --data-parallel-rpc-port (ParallelConfig.data_parallel_rpc_port),
# so a node started by plain `vllm serve` and one started by the supervisor agree unconfigured.
DEFAULT_DP_RPC_PORT = 29550
# What a rank needs beyond vLLM's --shutdown-timeout to exit after draining.
SHUTDOWN_MARGIN_S = 5.0


class ConfigError(ValueError):
    """Bad input. The message is one line an operator can act on."""


class Mode(enum.Enum):
    REPLICAS = "replicas"
    DP = "dp"


class DeviceKind(enum.Enum):
    AUTO = "auto"
    CUDA = "cuda"
    CPU = "cpu"
    NONE = "none"  # no device assignment: ranks inherit the supervisor's environment as it is


class LogFormat(enum.Enum):
    TEXT = "text"
    JSON = "json"


# --tee: which ranks' output goes to the console. None: all; () : none.
Tee = tuple[int, ...] | None
NO_LOG_DIR = "none"


@dataclasses.dataclass(frozen=True)
class Config:
    dp_size_local: int
    port: int = 8000
    supervisor_port: int = 9256
    host: str = "0.0.0.0"
    supervisor_host: str | None = None  # None: same as host
    server_cmd: tuple[str, ...] = ("vllm", "serve")
    child_args: tuple[str, ...] = ()  # passed to every rank unchanged
    server: ServerArgs = ServerArgs()  # what the supervisor reads from them
    mode: Mode = Mode.REPLICAS
    data_parallel_size: int | None = None  # None: dp_size_local
    data_parallel_start_rank: int = 0
    node_rank: int | None = None  # dp mode: start rank = node_rank x dp_size_local
    data_parallel_address: str = "127.0.0.1"
    data_parallel_rpc_port: int = DEFAULT_DP_RPC_PORT
    device: DeviceKind = DeviceKind.AUTO
    devices: tuple[str, ...] | None = None
    probe_interval: float = 1.0
    probe_timeout: float = 2.0
    startup_probe_interval: float = 0.2
    failure_threshold: int = 3
    startup_timeout: float = 1800.0
    progress_interval: float = 30.0
    stop_timeout: float = 30.0
    log_level: str = "info"
    log_format: LogFormat = LogFormat.TEXT
    log_dir: str | None = None  # None: under the system temp dir; NO_LOG_DIR: no files
    run_id: str | None = None   # None: a timestamp
    tee: Tee = None
    log_max_bytes: int = 100 << 20
    restart_policy: RestartPolicy = RestartPolicy.NEVER
    max_restarts: int = 3
    restart_window: float = 600.0
    restart_backoff: float = 1.0
    stable_after: float = 60.0
    no_restart_exit_codes: frozenset[int] = frozenset({2})
    min_ready_ranks: int | None = None  # None: all
    deep_probe_interval: float = 30.0  # 0: off
    deep_probe_timeout: float = 10.0
    ft_recovery_timeout: float = 60.0
    admin_token: str | None = dataclasses.field(default=None, repr=False)
    admin_token_file: str | None = None

    @property
    def api_host(self) -> str:
        return self.supervisor_host if self.supervisor_host is not None else self.host

    @property
    def rank_ports(self) -> range:
        return range(self.port, self.port + self.dp_size_local)

    @property
    def dp_size(self) -> int:
        return self.data_parallel_size if self.data_parallel_size is not None else self.dp_size_local

    @property
    def fault_tolerance(self) -> bool:
        """The ranks run vLLM's in-engine recovery: the supervisor orchestrates it."""
        return self.server.fault_tolerance

    @property
    def ready_quorum(self) -> int:
        return self.min_ready_ranks if self.min_ready_ranks is not None else self.dp_size_local

    @property
    def restart_rules(self) -> RestartRules:
        return RestartRules(self.restart_policy, self.max_restarts, self.restart_window,
                            self.restart_backoff, self.stable_after, self.no_restart_exit_codes)

    @property
    def devices_per_rank(self) -> int:
        return self.server.devices_per_rank


# ---- value parsers: each raises ValueError with a message that completes "bad value: ..." ----

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError("must be a port between 1 and 65535")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a positive number of seconds")
    return value


def _seconds_or_off(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be 0 (off) or a positive number of seconds")
    return value


def _host(text: str) -> str:
    if not text or any(c.isspace() for c in text):
        raise ValueError("must be a host name or address")
    return text


def _command(text: str) -> tuple[str, ...]:
    try:
        argv = tuple(shlex.split(text))
    except ValueError as exc:  # unbalanced quotes
        raise ValueError(f"cannot be split like a shell would: {exc}") from None
    if not argv:
        raise ValueError("is empty")
    return argv


def _devices(text: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in text.split(","))
    if not items or any(not item.isdigit() for item in items):
        raise ValueError("must be a comma-separated list of device indexes, e.g. 0,1,2,3")
    if len(set(items)) != len(items):
        raise ValueError("lists a device twice")
    return items


def _choice(enum_type: type[enum.Enum]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return enum_type(text.strip().lower())
        except ValueError:
            raise ValueError("must be one of " + ", ".join(m.value for m in enum_type)) from None
    return parse


def _bytes(text: str) -> int:
    """100000, 64K, 100M, 1G (binary multiples)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in "KMG" else ""
    value = int(t[:len(t) - len(unit)]) * units[unit]
    if value < 4096:
        raise ValueError("must be at least 4096 bytes")
    return value


def _run_id(text: str) -> str:
    if not text or text in (".", "..") or "/" in text or "\0" in text:
        raise ValueError("must be a plain directory name")
    return text


def _tee(text: str) -> Tee:
    t = text.strip().lower()
    if t == "all":
        return None
    if t == "none":
        return ()
    try:
        ranks = tuple(sorted({int(x) for x in t.split(",")}))
    except ValueError:
        raise ValueError("must be all, none, or a comma-separated list of ranks") from None
    if any(r < 0 for r in ranks):
        raise ValueError("ranks are 0 or more")
    return ranks


def _exit_codes(text: str) -> frozenset[int]:
    if text.strip().lower() == "none":
        return frozenset()
    codes = frozenset(int(c) for c in text.split(","))
    if any(not 0 <= c <= 255 for c in codes):
        raise ValueError("exit codes are 0-255")
    return codes


def _token(text: str) -> str:
    if not text.strip() or any(c.isspace() for c in text.strip()):
        raise ValueError("must be non-empty, without spaces")
    return text.strip()


def _log_level(text: str) -> str:
    level = text.strip().lower()
    if level not in {"debug", "info", "warning", "error"}:
        raise ValueError("must be one of debug, info, warning, error")
    return level


@dataclasses.dataclass(frozen=True)
class _Option:
    flag: str
    parse: Callable[[str], Any]
    help: str
    metavar: str
    secret: bool = False  # never echoed in an error

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


OPTIONS: tuple[_Option, ...] = (
    _Option("--dp-size-local", _positive_int, "ranks (vLLM servers) on this node; required", "N"),
    _Option("--port", _port, "first rank's port; rank i listens on PORT+i (default 8000)", "PORT"),
    _Option("--supervisor-port", _port, "port of /live /ready /status (default 9256)", "PORT"),
    _Option("--host", _host, "address the ranks listen on (default 0.0.0.0)", "HOST"),
    _Option("--supervisor-host", _host, "address of the supervisor API (default: --host)", "HOST"),
    _Option("--server-cmd", _command,
            "command that starts one server, split like a shell would, run without one "
            "(default 'vllm serve')", "CMD"),
    _Option("--mode", _choice(Mode),
            "replicas: independent servers (dense models); dp: MoE external data-parallel ranks "
            "(default replicas)", "MODE"),
    _Option("--data-parallel-size", _positive_int, "dp mode: global DP size (default: --dp-size-local)", "N"),
    _Option("--data-parallel-start-rank", _non_negative_int, "dp mode: DP rank of local rank 0 (default 0)", "N"),
    _Option("--node-rank", _non_negative_int,
            "dp mode: this node's index; sets --data-parallel-start-rank to N x --dp-size-local "
            "(for a StatefulSet's pod index)", "N"),
    _Option("--data-parallel-address", _host, "dp mode: address of DP rank 0 (default 127.0.0.1)", "HOST"),
    _Option("--data-parallel-rpc-port", _port, f"dp mode: DP RPC port (default {DEFAULT_DP_RPC_PORT})", "PORT"),
    _Option("--device", _choice(DeviceKind),
            "cuda: ranks get CUDA_VISIBLE_DEVICES; cpu: ranks get their own cores (shared round "
            "robin when there are fewer cores than ranks); none: no device assignment at all; "
            "auto: cuda when a GPU is visible (default auto)", "KIND"),
    _Option("--devices", _devices,
            "GPU indexes to use, relative to the supervisor's CUDA_VISIBLE_DEVICES "
            "(default: all visible)", "LIST"),
    _Option("--probe-interval", _seconds, "seconds between /health probes of a ready rank (default 1)", "S"),
    _Option("--probe-timeout", _seconds, "seconds before a probe counts as failed (default 2)", "S"),
    _Option("--startup-probe-interval", _seconds,
            "seconds between probes while a rank starts (default 0.2)", "S"),
    _Option("--failure-threshold", _positive_int,
            "consecutive failed probes that make a ready rank unhealthy (default 3)", "N"),
    _Option("--startup-timeout", _seconds, "seconds a rank may take to become ready (default 1800)", "S"),
    _Option("--progress-interval", _seconds,
            "while a rank starts, log a line with its latest output this often (default 30)", "S"),
    _Option("--stop-timeout", _seconds,
            "seconds ranks get after the forwarded signal before every process of their trees "
            "is SIGKILLed (default 30; at least the child's --shutdown-timeout + 5)", "S"),
    _Option("--log-level", _log_level, "debug, info, warning or error (default info)", "LEVEL"),
    _Option("--log-format", _choice(LogFormat),
            "text, or json: one JSON object per line for the supervisor's own lines and "
            "{\"rank\", \"stream\", \"line\"} for rank output (default text)", "FMT"),
    _Option("--log-dir", str,
            "rank output is written to DIR/<run-id>/attempt_<k>/rank_<i>/{stdout,stderr}.log; "
            "'none' keeps nothing on disk (default: under the system temp dir)", "DIR"),
    _Option("--run-id", _run_id, "name of this run's log directory (default: a timestamp)", "ID"),
    _Option("--tee", _tee, "ranks whose output is copied to stdout as '[rank<i>] ' lines: all, none "
            "or a list such as 0,2 (default all)", "WHICH"),
    _Option("--log-max-bytes", _bytes,
            "size at which a rank's log file rotates to .1, e.g. 100M (default 100M)", "SIZE"),
    _Option("--restart-policy", _choice(RestartPolicy),
            "never: a failed rank stops the pod; on-failure: restart it unless its exit code is in "
            "--no-restart-exit-codes; always: restart it whatever the code (default never)", "POLICY"),
    _Option("--max-restarts", _non_negative_int, "restarts of one rank within --restart-window (default 3)", "N"),
    _Option("--restart-window", _seconds, "seconds over which --max-restarts counts (default 600)", "S"),
    _Option("--restart-backoff", _seconds,
            "first delay before a restart, doubling each time up to 60 s, with jitter (default 1)", "S"),
    _Option("--stable-after", _seconds, "seconds ready after which a rank's backoff resets (default 60)", "S"),
    _Option("--no-restart-exit-codes", _exit_codes,
            "exit codes never retried under on-failure, comma-separated, or none (default 2)", "LIST"),
    _Option("--deep-probe-interval", _seconds_or_off,
            "seconds between one-token completions sent to each ready rank that is not visibly "
            "busy, to catch an engine hung behind a healthy /health; 0 turns it off (default 30)", "S"),
    _Option("--deep-probe-timeout", _seconds, "seconds a deep probe may take (default 10)", "S"),
    _Option("--ft-recovery-timeout", _seconds,
            "with vLLM's --enable-fault-tolerance: seconds a faulted group gets to recover after the "
            "supervisor's retry before it is restarted instead (default 60, under vLLM's 120)", "S"),
    _Option("--min-ready-ranks", _positive_int, "/ready is 200 while at least K ranks are ready "
            "(default: all)", "K"),
    _Option("--admin-token", _token, "enables POST /drain, /undrain, /stop, /ranks/<i>/restart for "
            "'Authorization: Bearer <token>' (prefer the env variable or a file)", "TOKEN", secret=True),
    _Option("--admin-token-file", str, "file holding the admin token (a mounted Kubernetes secret)", "PATH"),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own errors: one line, no usage dump
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        usage=f"{PROG} --dp-size-local N [options] [-- SERVER ARGS...]",
        description="Start one vLLM OpenAI-compatible server per local rank, probe their /health, "
                    "serve /live, /ready and /status, and stop every process of every rank on "
                    "SIGTERM or when a rank fails.",
        epilog="Every option can also be set with the environment variable shown in brackets; the "
               "command line wins. Arguments after -- go to every rank's server unchanged (the model "
               "first, for vLLM), followed by --host and --port (and the data-parallel flags in dp mode).\n"
               "Exit codes: 0 stopped on request; the failed rank's code (128+N if killed by signal N); "
               "1 a rank was unhealthy, not ready in time or exited by itself with 0; 2 bad configuration.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    for opt in OPTIONS:
        parser.add_argument(opt.flag, dest=opt.dest, metavar=opt.metavar, default=None,
                            help=f"{opt.help} [{opt.env}]")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(PROG)
    except PackageNotFoundError:
        return "unknown"


def split_child_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Our options before the first `--`, the servers' arguments after it."""
    argv = list(argv)
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


# Flags the supervisor appends itself: one given after `--` would be silently overridden.
_RESERVED_CHILD_FLAGS = ("--host", "--port")
_DP_CHILD_FLAGS = ("--data-parallel-size", "--data-parallel-rank", "--data-parallel-size-local",
                   "--data-parallel-address", "--data-parallel-rpc-port", "--data-parallel-start-rank")


def parse_config(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """Parse and validate. Raises ConfigError with a one-line message."""
    own, child = split_child_args(argv)
    parser = build_parser()
    try:
        ns, extra = parser.parse_known_args(own)
    except ConfigError:
        raise
    if extra:
        raise ConfigError(f"unrecognized arguments: {' '.join(extra)} "
                          "(arguments for the server go after --, e.g. -- MODEL --max-model-len 4096)")

    values: dict[str, Any] = {}
    explicit: set[str] = set()
    for opt in OPTIONS:
        raw = getattr(ns, opt.dest)
        source = opt.flag
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
        explicit.add(opt.dest)

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
    _validate(config, explicit)
    return config


def _validate(config: Config, explicit: set[str]) -> None:
    n = config.dp_size_local
    last_port = config.port + n - 1
    if last_port > 65535:
        raise ConfigError(f"--port {config.port} with {n} ranks needs ports up to {last_port}, past 65535")
    if config.supervisor_port in config.rank_ports:
        raise ConfigError(f"--supervisor-port {config.supervisor_port} is inside the ranks' ports "
                          f"{config.port}-{last_port}")

    server = config.server
    for flag in _RESERVED_CHILD_FLAGS:
        if server.present(flag):
            raise ConfigError(f"server argument {flag} is set by the supervisor per rank; "
                              f"use the supervisor's {flag} instead")

    if config.mode is Mode.DP:
        for flag in _DP_CHILD_FLAGS:
            if server.present(flag):
                raise ConfigError(f"server argument {flag} is set by the supervisor in dp mode; "
                                  "use the supervisor's --data-parallel-* options instead")
        if config.data_parallel_start_rank + n > config.dp_size:
            raise ConfigError(f"--data-parallel-start-rank {config.data_parallel_start_rank} + "
                              f"--dp-size-local {n} exceeds --data-parallel-size {config.dp_size}")
        if config.data_parallel_rpc_port in config.rank_ports or \
                config.data_parallel_rpc_port == config.supervisor_port:
            raise ConfigError(f"--data-parallel-rpc-port {config.data_parallel_rpc_port} collides "
                              "with a rank port or the supervisor port")
    else:
        for flag in _DP_CHILD_FLAGS:
            if server.present(flag):
                raise ConfigError(f"server argument {flag} has no place in replicas mode: each rank is one "
                                  "engine (more ranks: --dp-size-local; MoE data parallelism: --mode dp)")
        for dest in ("data_parallel_size", "data_parallel_start_rank", "node_rank"):
            if dest in explicit:
                raise ConfigError(f"--{dest.replace('_', '-')} only applies to --mode dp")

    if config.devices is not None and config.device in (DeviceKind.CPU, DeviceKind.NONE):
        raise ConfigError(f"--devices lists GPUs; it cannot be used with --device {config.device.value}")

    try:  # a malformed -tp/-pp/--shutdown-timeout fails here, before anything starts
        server.devices_per_rank  # noqa: B018
        shutdown = server.seconds("--shutdown-timeout")
    except ServerArgsError as exc:
        raise ConfigError(str(exc)) from None
    if shutdown is not None and config.stop_timeout < shutdown + SHUTDOWN_MARGIN_S:
        if "stop_timeout" in explicit:
            raise ConfigError(f"--stop-timeout {config.stop_timeout:g} is shorter than the ranks' "
                              f"--shutdown-timeout {shutdown:g} + {SHUTDOWN_MARGIN_S:g} s: ranks would be "
                              "killed while draining")
    if config.min_ready_ranks is not None and config.min_ready_ranks > n:
        raise ConfigError(f"--min-ready-ranks {config.min_ready_ranks} is more than the {n} rank(s)")
    if config.admin_token is not None and config.admin_token_file is not None:
        raise ConfigError("give the admin token once: --admin-token or --admin-token-file")
    if config.tee and max(config.tee) >= n:
        raise ConfigError(f"--tee lists rank {max(config.tee)}, but ranks are 0-{n - 1}")
    if config.log_dir is not None and not config.log_dir.strip():
        raise ConfigError("--log-dir is empty (use 'none' to keep no log files)")
    if config.startup_probe_interval > config.startup_timeout:
        raise ConfigError("--startup-probe-interval is longer than --startup-timeout")


def effective_stop_timeout(config: Config) -> float:
    """--stop-timeout, raised to cover the ranks' own --shutdown-timeout when left at its default."""
    shutdown = config.server.seconds("--shutdown-timeout")
    if shutdown is None:
        return config.stop_timeout
    return max(config.stop_timeout, shutdown + SHUTDOWN_MARGIN_S)
