"""The cross-field rules of the configuration: each takes the parsed `Config` and the names of
the options given explicitly, and raises ConfigError with one line. Pure."""

from __future__ import annotations

from vllm_dp_supervisor.server.args import ServerArgsError
from vllm_dp_supervisor.settings import kv_events
from vllm_dp_supervisor.settings.config import SHUTDOWN_MARGIN_S, Config, ConfigError, DeviceKind, Mode

# ---- cross-field rules: each raises ConfigError, one line ----

# Flags the supervisor appends itself: one given after `--` would be silently overridden.
_RESERVED_CHILD_FLAGS = ("--host", "--port")
_DP_CHILD_FLAGS = ("--data-parallel-size", "--data-parallel-rank", "--data-parallel-size-local",
                   "--data-parallel-address", "--data-parallel-rpc-port", "--data-parallel-start-rank")


def _check_ports(config: Config, explicit: set[str]) -> None:
    n, last_port = config.dp_size_local, config.port + config.dp_size_local - 1
    if last_port > 65535:
        raise ConfigError(f"--port {config.port} with {n} ranks needs ports up to {last_port}, past 65535")
    if config.supervisor_port in config.rank_ports:
        raise ConfigError(f"--supervisor-port {config.supervisor_port} is inside the ranks' ports "
                          f"{config.port}-{last_port}")
    router = config.router_port
    if router is not None and router in config.rank_ports:
        raise ConfigError(f"--router-port {router} is inside the ranks' ports {config.port}-{last_port}"
                          " (pick another, or --router-port none)")
    if router is not None and router == config.supervisor_port:
        raise ConfigError(f"--router-port {router} is also --supervisor-port")


def _check_server_args(config: Config, explicit: set[str]) -> None:
    server = config.server
    for flag in _RESERVED_CHILD_FLAGS:
        if server.present(flag):
            raise ConfigError(f"server argument {flag} is set by the supervisor per rank; "
                              f"use the supervisor's {flag} instead")
    for flag in _DP_CHILD_FLAGS:
        if server.present(flag) and config.mode is Mode.DP:
            raise ConfigError(f"server argument {flag} is set by the supervisor in dp mode; "
                              "use the supervisor's --data-parallel-* options instead")
        if server.present(flag):
            raise ConfigError(f"server argument {flag} has no place in replicas mode: each rank is one "
                              "engine (more ranks: --dp-size-local; MoE data parallelism: --mode dp)")
    try:  # a malformed -tp/-pp/--shutdown-timeout fails here, before anything starts
        server.devices_per_rank  # noqa: B018
        shutdown = server.seconds("--shutdown-timeout")
    except ServerArgsError as exc:
        raise ConfigError(str(exc)) from None
    if shutdown is not None and "stop_timeout" in explicit and config.stop_timeout < shutdown + SHUTDOWN_MARGIN_S:
        raise ConfigError(f"--stop-timeout {config.stop_timeout:g} is shorter than the ranks' "
                          f"--shutdown-timeout {shutdown:g} + {SHUTDOWN_MARGIN_S:g} s: ranks would be "
                          "killed while draining")


def _check_dp(config: Config, explicit: set[str]) -> None:
    n = config.dp_size_local
    if config.mode is not Mode.DP:
        for dest in ("data_parallel_size", "data_parallel_start_rank", "node_rank"):
            if dest in explicit:
                raise ConfigError(f"--{dest.replace('_', '-')} only applies to --mode dp")
        return
    if config.data_parallel_start_rank + n > config.dp_size:
        raise ConfigError(f"--data-parallel-start-rank {config.data_parallel_start_rank} + "
                          f"--dp-size-local {n} exceeds --data-parallel-size {config.dp_size}")
    if config.data_parallel_rpc_port in config.rank_ports or \
            config.data_parallel_rpc_port in (config.supervisor_port, config.router_port):
        raise ConfigError(f"--data-parallel-rpc-port {config.data_parallel_rpc_port} collides "
                          "with a rank port, the supervisor port or the router port")


def _check_the_rest(config: Config, explicit: set[str]) -> None:
    n = config.dp_size_local
    if config.devices is not None and config.device in (DeviceKind.CPU, DeviceKind.NONE):
        raise ConfigError(f"--devices lists GPUs; it cannot be used with --device {config.device.value}")
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


def _check_cache(config: Config, explicit: set[str]) -> None:
    if not config.router_policy.reads_kv_events:
        if "kv_events_port" in explicit or "router_cache_weight" in explicit:
            raise ConfigError("--kv-events-port and --router-cache-weight apply to --router-policy cache")
        return
    if kv_events.prefix_caching_off(config):
        raise ConfigError("--router-policy cache routes by the ranks' prefix caches, which the server "
                          "arguments turn off (--no-enable-prefix-caching)")
    if config.model_source is None:
        raise ConfigError("--router-policy cache reads the model's tokenizer: name the model first after "
                          "`--` (vllm serve MODEL) or with --model")
    kv_events.user_config(config)  # a config of the user's the policy cannot read fails now
    if config.mode is Mode.DP and config.server.value(kv_events.FLAG) is None:
        ports = range(config.kv_events_port, config.kv_events_port + 2 * config.dp_size)
        if ports.stop - 1 > 65535:
            raise ConfigError(f"--kv-events-port {config.kv_events_port} with data-parallel size "
                              f"{config.dp_size} needs ports up to {ports.stop - 1}, past 65535")
        taken = {*config.rank_ports, config.supervisor_port, config.router_port, config.data_parallel_rpc_port}
        if taken & set(ports):
            raise ConfigError(f"--kv-events-port {config.kv_events_port}: the KV event ports "
                              f"{ports.start}-{ports.stop - 1} collide with the ranks', the supervisor's, "
                              "the router's or the data-parallel RPC port")


CHECKS = (_check_ports, _check_server_args, _check_dp, _check_cache, _check_the_rest)
