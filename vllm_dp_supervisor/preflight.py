"""Checks that need the machine (ports, the server command, devices), before anything starts."""

from __future__ import annotations

import getpass
import importlib.util
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from vllm_dp_supervisor.procs import linux
from vllm_dp_supervisor.settings.config import (
    API_BACKLOG,
    NO_LOG_DIR,
    OTLP_EXPORTERS,
    OTLP_PROTOCOL_ENV,
    ROUTER_BACKLOG,
    Config,
    ConfigError,
)
from vllm_dp_supervisor.settings.plan import Inventory


def detect_inventory(environ: Mapping[str, str]) -> Inventory:
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = tuple(d.strip() for d in visible.split(",") if d.strip())
    else:
        gpus = tuple(str(i) for i in range(_count_nvidia_gpus()))
    inductor = None
    if "TORCHINDUCTOR_CACHE_DIR" not in environ:
        # torch's own default, computed before the ranks' TMPDIR changes it.
        inductor = os.path.join(tempfile.gettempdir(), f"torchinductor_{_user()}")
    return Inventory(gpus=gpus, cpus=tuple(sorted(os.sched_getaffinity(0))), inductor_cache=inductor)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _count_nvidia_gpus() -> int:
    """GPUs the NVIDIA driver shows, without importing CUDA or running nvidia-smi."""
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        pass
    try:
        return sum(1 for name in os.listdir("/dev") if re.fullmatch(r"nvidia\d+", name))
    except OSError:
        return 0


# vLLM puts its ZMQ IPC sockets at <VLLM_RPC_BASE_PATH>/<uuid4>; a Unix socket path has at most
# 107 bytes, so a rank's directory may have at most 107 - 1 - 36 = 70.
MAX_RANK_DIR = 107 - 1 - 36


def choose_run_dir(ranks: int, environ: Mapping[str, str]) -> Path:
    """The supervisor's scratch directory (rank i's TMPDIR and VLLM_RPC_BASE_PATH are
    <it>/rank<i>): under the temp dir if that is short enough for vLLM's IPC socket paths,
    else under /tmp. Created by the caller once everything else is checked."""
    name = f"vdps-{os.getpid()}-{os.urandom(3).hex()}"
    temp = environ.get("TMPDIR") or tempfile.gettempdir()
    for base in dict.fromkeys((temp, "/tmp")):
        candidate = Path(base) / name
        if len(str(candidate / f"rank{ranks - 1}")) <= MAX_RANK_DIR and os.access(base, os.W_OK):
            return candidate
    raise ConfigError(f"TMPDIR {temp} is too long for vLLM's IPC socket paths (a rank's directory may have "
                      f"at most {MAX_RANK_DIR} characters) and /tmp is not writable: set TMPDIR to a shorter path")


def prepare_log_dir(config: Config) -> Path | None:
    """Create this run's log directory now, so an unwritable one fails before anything starts."""
    if config.log_dir == NO_LOG_DIR:
        return None
    base = Path(config.log_dir) if config.log_dir else Path(tempfile.gettempdir()) / "vllm-dp-supervisor"
    run_id = config.run_id or time.strftime("%Y%m%dT%H%M%S")
    path = base / run_id
    if config.run_id is None and path.exists():  # two starts within a second
        path = base / f"{run_id}-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".writable"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--log-dir {base}: cannot write {path}: {exc.strerror}") from None
    return path


def admin_token(config: Config) -> str | None:
    """The admin token, read from --admin-token-file if given. Never put into a message."""
    if config.admin_token_file is None:
        return config.admin_token
    try:
        token = Path(config.admin_token_file).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"--admin-token-file {config.admin_token_file}: {exc.strerror}") from None
    if not token or any(c.isspace() for c in token):
        raise ConfigError(f"--admin-token-file {config.admin_token_file}: the token must be one "
                          "non-empty word")
    return token


def check_server_cmd(config: Config, environ: Mapping[str, str]) -> None:
    program = config.server_cmd[0]
    if "/" in program:
        if not (os.path.isfile(program) and os.access(program, os.X_OK)):
            raise ConfigError(f"--server-cmd: {program} is not an executable file")
    elif shutil.which(program, path=environ.get("PATH", os.defpath)) is None:
        hint = " (is vLLM installed in this environment?)" if program == "vllm" else ""
        raise ConfigError(f"--server-cmd: {program!r} was not found on PATH{hint}")


def check_tracing(config: Config, environ: Mapping[str, str]) -> None:
    """What --otlp-traces-endpoint needs, looked up without importing it: the `[otel]` extra
    installs it (a vLLM image has it)."""
    if config.otlp_traces_endpoint is None:
        return
    protocol = environ.get(OTLP_PROTOCOL_ENV, "grpc")
    if protocol not in OTLP_EXPORTERS:
        raise ConfigError(f"{OTLP_PROTOCOL_ENV}={protocol!r}: must be grpc or http/protobuf (what vLLM takes too)")
    for module in ("opentelemetry.sdk.trace", OTLP_EXPORTERS[protocol]):
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:  # a parent package is missing
            found = False
        if not found:
            raise ConfigError(f"--otlp-traces-endpoint needs OpenTelemetry ({module} is not installed): "
                              "pip install 'vllm-dp-supervisor[otel]'")


def _family(host: str) -> socket.AddressFamily:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    return infos[0][0]


def who_listens(port: int) -> str:
    """'pid 123 (python3)' for the process listening on `port`, when we can see it."""
    holders = linux.socket_holders(linux.listening_inodes(port))
    if not holders:
        return "another process"
    return linux.describe_pids(holders)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-capable socket bound like uvicorn and vLLM bind (SO_REUSEADDR).

    IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on connections whose socket says TCP, and
    accepted connections inherit it from here. Without it every response waits ~40 ms for a
    delayed ACK (Nagle), and /ready serves ~25 requests/s per connection instead of thousands.
    """
    sock = socket.socket(_family(host), socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def check_rank_ports(config: Config) -> None:
    for rank, port in enumerate(config.rank_ports):
        try:
            bind_socket(config.host, port).close()
        except OSError as exc:
            if exc.errno == 98:  # EADDRINUSE
                raise ConfigError(f"port {port} (rank {rank}) is already in use on {config.host} "
                                  f"by {who_listens(port)}") from None
            raise ConfigError(f"cannot bind rank {rank}'s port {port} on {config.host}: {exc.strerror}") from None


def open_api_socket(config: Config) -> socket.socket:
    """Bound and listening now, so the port is ours before any rank starts."""
    return _listening(config.api_host, config.supervisor_port, "--supervisor-port", API_BACKLOG)


def open_router_socket(config: Config) -> socket.socket | None:
    """The router's port, bound and listening now (None: no router). The workers accept on it;
    the supervisor keeps it open until they drained."""
    if config.router_port is None:
        return None
    return _listening(config.router_listen_host, config.router_port, "--router-port", ROUTER_BACKLOG,
                      " (or --router-port none)")


def _listening(host: str, port: int, flag: str, backlog: int, hint: str = "") -> socket.socket:
    try:
        sock = bind_socket(host, port)
    except OSError as exc:
        if exc.errno == 98:
            raise ConfigError(f"{flag} {port} is already in use by {who_listens(port)}{hint}") from None
        raise ConfigError(f"cannot bind {flag} {port} on {host}: {exc.strerror}") from None
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
