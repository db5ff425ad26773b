"""The supervisor's settings: one frozen `Config`, its defaults (written here once: `--help` and
the docs' option table show these), the enums its fields take, and the slices of it that other
packages are handed (`RestartRules` for the core's restart budget, `RouterSettings` for a router
worker). Pure data; `options.py` turns a command line and an environment into it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import socket

from vllm_dp_supervisor.server.args import ServerArgs
from vllm_dp_supervisor.settings.parsers import Tee

PROG = "vllm-dp-supervisor"
ENV_PREFIX = "SUPERVISOR_"
# vLLM 0.32's own default for --data-parallel-rpc-port (ParallelConfig.data_parallel_rpc_port),
# so a node started by plain `vllm serve` and one started by the supervisor agree unconfigured.
DEFAULT_DP_RPC_PORT = 29550
# What a rank needs beyond vLLM's --shutdown-timeout to exit after draining.
SHUTDOWN_MARGIN_S = 5.0


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(PROG)
    except PackageNotFoundError:
        return "unknown"


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


class RankLogs(enum.Enum):
    """Who may read the ranks' log lines on the control port (/status, /events)."""
    ADMIN = "admin"  # requests with the admin token
    ALL = "all"  # anyone who reaches the port


class LogFormat(enum.Enum):
    TEXT = "text"
    JSON = "json"


class RestartPolicy(enum.Enum):
    NEVER = "never"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"


class RouterPolicy(enum.Enum):
    """--router-policy. What each does is one file of router/policies/ (its `build` is the one
    place the router reads the name); what the supervisor prepares for one is said here."""
    LEAST_REQUESTS = "least-requests"
    ROUND_ROBIN = "round-robin"
    PREFIX = "prefix"
    SESSION = "session"
    CACHE = "cache"

    @property
    def reads_kv_events(self) -> bool:
        """The ranks publish their KV-cache events for it (settings/kv_events.py)."""
        return self is RouterPolicy.CACHE


MAX_BACKOFF_S = 60.0  # the restart delay doubles up to this


@dataclasses.dataclass(frozen=True)
class RestartRules:
    """The restart options of `Config`, as the core's restart budget reads them."""
    policy: RestartPolicy
    max_restarts: int
    window_s: float
    backoff_s: float
    stable_after_s: float
    no_restart_exit_codes: frozenset[int]


@dataclasses.dataclass(frozen=True)
class RouterSettings:
    """What a router worker process needs of `Config`: sent to it as one message at its start
    (router/protocol.py). Built only by `Config.router_settings`, so no field has a default of its
    own: each value is `Config`'s (its option's default, or what the user gave)."""
    host: str  # where the ranks are reached
    policy: RouterPolicy
    queue_timeout: float
    retries: int
    max_body: int
    prefix_chars: int
    session_header: str
    load_bound: float
    stall_timeout: float  # 0: not watched
    backlog: int  # the listening socket's, which every worker's accept loop sets again
    resume: bool  # streams cut by a rank's failure continue on another rank (router/continuation.py)
    force_usage: bool  # the ranks send usage to every stream (vLLM's --enable-force-include-usage)
    prompt_details: bool  # the ranks tell each answer's cached tokens (vLLM's --enable-prompt-tokens-details)
    priority_scheduling: bool  # the ranks schedule by priority: a continuation goes before its peers
    cache_weight: float  # cache policy: a whole prompt held against a full load (router/policies/cache.py)
    kv_events: tuple[tuple[int, str, str | None], ...]  # cache policy: (rank, events, replay) endpoints
    model: ModelSource | None  # cache policy: where the tokenizer and the chat template are
    metrics_at: tuple[str, int] | None  # the control port (host, port): GET /metrics is its (pod_metrics.py)
    otlp_traces_endpoint: str | None  # where the request spans go (router/tracing.py); None: no tracing


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where the ranks' model files are, as their arguments say (vLLM's flags of the same names)."""
    model: str
    tokenizer: str | None = None
    revision: str | None = None  # --tokenizer-revision, else --revision
    download_dir: str | None = None
    chat_template: str | None = None
    model_revision: str | None = None  # --revision: where the model's generation_config.json is
    generation_config: str | None = None  # --generation-config: "auto" (None), "vllm", or a directory
    override_generation_config: str | None = None  # --override-generation-config (JSON)
    # What requests call the base model: --served-model-name's names, else the model as given. A
    # request naming anything else (a LoRA adapter) is not the base model's blocks.
    names: tuple[str, ...] = ()


# vLLM flags under which a streamed answer is not plain text a continuation can carry on (a
# reasoning parser's reasoning, a tool parser's calls): the router continues no stream then.
PARSER_FLAGS = ("--reasoning-parser", "--tool-call-parser", "--enable-auto-tool-choice")

# OpenTelemetry's OTLP trace exporter per OTEL_EXPORTER_OTLP_TRACES_PROTOCOL (vLLM's switch too,
# gRPC by default): router/tracing.py makes one, preflight.py checks it is installed.
OTLP_PROTOCOL_ENV = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
OTLP_EXPORTERS = {"grpc": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
                  "http/protobuf": "opentelemetry.exporter.otlp.proto.http.trace_exporter"}

# Listen backlogs. The API's is small: it is also how many connections asyncio accepts in one
# burst, and its connection budget leaves room for a few bursts (api/bounds.py). The router's is
# the kernel's largest: connections wait there while the workers are busy or restart.
API_BACKLOG = 64
ROUTER_BACKLOG = socket.SOMAXCONN

NO_LOG_DIR = "none"
NO_FILE = "none"
# Kubernetes shows this file's content in `kubectl describe pod` as the container's last state.
DEFAULT_TERMINATION_LOG = "/dev/termination-log"


@dataclasses.dataclass(frozen=True)
class Config:
    dp_size_local: int
    port: int = 8000
    supervisor_port: int = 9256
    host: str = "0.0.0.0"
    supervisor_host: str | None = None  # None: same as host
    server_cmd: tuple[str, ...] = ("vllm", "serve")
    child_args: tuple[str, ...] = ()  # passed to every rank unchanged
    server: ServerArgs = dataclasses.field(default_factory=ServerArgs)  # what the supervisor reads from them
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
    drain_timeout: float | None = None  # None: the stop budget (--stop-timeout, raised as it is)
    log_level: str = "info"
    log_format: LogFormat = LogFormat.TEXT
    log_dir: str | None = None  # None: under the system temp dir; NO_LOG_DIR: no files
    run_id: str | None = None   # None: a timestamp
    tee: Tee = None
    log_max_bytes: int = 100 << 20
    restart_policy: RestartPolicy = RestartPolicy.ON_FAILURE
    max_restarts: int = 3
    restart_window: float = 600.0
    restart_backoff: float = 1.0
    stable_after: float = 60.0
    no_restart_exit_codes: frozenset[int] = frozenset({2})
    min_ready_ranks: int | None = None  # None: half the ranks, rounded up (replicas); all (dp)
    router_port: int | None = 8080  # None: no router
    router_host: str | None = None  # None: same as host
    router_workers: int = 1
    router_policy: RouterPolicy = RouterPolicy.LEAST_REQUESTS
    router_queue_timeout: float = 5.0
    router_retries: int = 2
    router_max_body: int = 16 << 20
    router_settle: float = 2.0
    router_prefix_chars: int = 1024
    router_session_header: str = "x-session-id"
    router_load_bound: float = 1.25
    router_cache_weight: float = 2.0
    kv_events_port: int = 5557  # vLLM's own default; dp mode under the cache policy
    stall_timeout: float = 0.3  # 0: off; cheap: a stall is judged by what the engine does (loops/judge.py)
    # A judged rank that produces nothing this long is hung (busy or idle). Measured: two cold CPU
    # ranks under logprobs, 4k-token and JSON-schema requests together went over 60 s to a first
    # token, busy compiling (bench/verdict_soak.py): 60 s killed a healthy one.
    hang_timeout: float = 300.0
    deep_probe_interval: float = 30.0  # 0: off
    deep_probe_timeout: float = 10.0
    ft_recovery_timeout: float = 60.0
    admin_token: str | None = dataclasses.field(default=None, repr=False)
    admin_token_file: str | None = None
    show_rank_logs: RankLogs = RankLogs.ADMIN
    termination_log: str | None = None  # None: /dev/termination-log when it exists; NO_FILE: none
    otlp_traces_endpoint: str | None = None  # None: no traces

    @property
    def api_host(self) -> str:
        return self.supervisor_host if self.supervisor_host is not None else self.host

    @property
    def router_listen_host(self) -> str:
        return self.router_host if self.router_host is not None else self.host

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
        """--min-ready-ranks. Its default in replicas mode is half the ranks, rounded up: one
        rank's restart (minutes, on a GPU) must not take the other loaded ranks out of the Service,
        but a pod left with less than half its capacity should shed its share to the other pods.
        In dp mode the ranks are one engine: all of them."""
        if self.min_ready_ranks is not None:
            return self.min_ready_ranks
        if self.mode is Mode.DP:
            return self.dp_size_local
        return (self.dp_size_local + 1) // 2

    @property
    def restart_rules(self) -> RestartRules:
        return RestartRules(self.restart_policy, self.max_restarts, self.restart_window,
                            self.restart_backoff, self.stable_after, self.no_restart_exit_codes)

    @property
    def devices_per_rank(self) -> int:
        return self.server.devices_per_rank

    @property
    def stop_budget(self) -> float:
        """--stop-timeout, raised to cover the ranks' own --shutdown-timeout when left at its
        default: how long a stop (or a drain) waits before it kills."""
        shutdown = self.server.seconds("--shutdown-timeout")
        if shutdown is None:
            return self.stop_timeout
        return max(self.stop_timeout, shutdown + SHUTDOWN_MARGIN_S)

    @property
    def drain_budget(self) -> float:
        """How long a planned stop of a rank waits for its requests before it hands its streams
        to other ranks."""
        return self.drain_timeout if self.drain_timeout is not None else self.stop_budget

    @property
    def rank_host(self) -> str:
        """Where this machine reaches a rank bound to --host."""
        return reachable_host(self.host)

    @property
    def router_settings(self) -> RouterSettings:
        """Without the KV-event endpoints, which the rank plan adds (plan.router_settings)."""
        return RouterSettings(
            host=self.rank_host, policy=self.router_policy, queue_timeout=self.router_queue_timeout,
            retries=self.router_retries, max_body=self.router_max_body, prefix_chars=self.router_prefix_chars,
            session_header=self.router_session_header, load_bound=self.router_load_bound,
            stall_timeout=self.stall_timeout, backlog=ROUTER_BACKLOG,
            resume=self.streams_resumable, force_usage=self.server.present("--enable-force-include-usage"),
            prompt_details=self.server.present("--enable-prompt-tokens-details"),
            priority_scheduling=self.server.value("--scheduling-policy") == "priority",
            cache_weight=self.router_cache_weight,
            kv_events=(), model=self.model_source, metrics_at=(reachable_host(self.api_host), self.supervisor_port),
            otlp_traces_endpoint=self.otlp_traces_endpoint)

    @property
    def streams_resumable(self) -> bool:
        """Whether a stream's text is plain text a continuation can carry on: not when the ranks
        run a reasoning or tool parser (flags, or a reasoning parser in
        --structured-outputs-config), nor a gpt-oss model (vLLM always parses its Harmony
        channels), read from its name."""
        server = self.server
        outputs = " ".join(f"{name} {value}" for name, value in server.flags
                           if name.startswith("--structured-outputs-config"))  # JSON, or vLLM's dotted form
        names = " ".join(filter(None, (server.model, server.value("--tokenizer")))).lower().replace("_", "-")
        return not any(server.present(f) for f in PARSER_FLAGS) and "reasoning" not in outputs \
            and "gpt-oss" not in names

    @property
    def model_source(self) -> ModelSource | None:
        server = self.server
        model = server.model
        if model is None:
            return None
        return ModelSource(model, server.value("--tokenizer"),
                           server.value("--tokenizer-revision") or server.value("--revision"),
                           server.value("--download-dir"), server.value("--chat-template"), server.value("--revision"),
                           server.value("--generation-config"), self._generation_override,
                           server.served_names or (model,))

    @property
    def _generation_override(self) -> str | None:
        """--override-generation-config as JSON, its dotted form (`.max_new_tokens 100`) merged in."""
        whole = self.server.value("--override-generation-config")
        # server.flags spells names with dashes; vLLM keeps a dotted key's underscores (HF's keys)
        dotted = {name.split(".", 1)[1].replace("-", "_"): value for name, value in self.server.flags
                  if name.startswith("--override-generation-config.") and value is not None}
        if not dotted:
            return whole
        try:
            merged = json.loads(whole) if whole else {}
        except ValueError:
            return whole  # vLLM refuses it too; the router says so at a cut
        for key, value in dotted.items():
            try:
                merged[key] = json.loads(value)
            except ValueError:
                merged[key] = value
        return json.dumps(merged)


def reachable_host(host: str) -> str:
    """Where to reach, from this machine, a server bound to `host`."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def url_host(host: str) -> str:
    """`host` as the host part of a URL (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host
