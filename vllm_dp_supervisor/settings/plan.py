"""Rank i → port, devices, argv and environment. Pure: the machine is described by `Inventory`.

A `RankSpec` is the blueprint of one rank; `rank.RankProcess` is one running instance of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from vllm_dp_supervisor.settings.config import Config, ConfigError, DeviceKind, Mode, RouterSettings, url_host
from vllm_dp_supervisor.settings.kv_events import FLAG, RankEvents, plan_events

RANK_ENV = "SUPERVISOR_LOCAL_RANK"
# Every rank process carries this run's tag, and so does whatever it starts without clearing its
# environment: a daemon that left the rank's process group is still known to be this run's (and
# which rank's), by the supervisor and by the guardian after the supervisor's death.
RUN_ENV = "SUPERVISOR_RUN"
# vLLM's KV-transfer side channels listen on a base port + the engine's data-parallel index (x TP
# for Mooncake): distinct for vLLM's own DP ranks, the same for independent replicas, which all
# have index 0 and would collide on one host. Replicas get base + rank, as DP ranks would.
# (variable, vLLM 0.32's default, multiply the rank by TP)
SIDE_CHANNELS = (("VLLM_NIXL_SIDE_CHANNEL_PORT", 5600, False), ("VLLM_P2P_SIDE_CHANNEL_PORT", 5710, False),
                 ("VLLM_MOONCAKE_BOOTSTRAP_PORT", 8998, True))


@dataclasses.dataclass(frozen=True)
class Inventory:
    """What the supervisor itself can use, read by `preflight.detect_inventory`."""
    # Entries of the supervisor's CUDA_VISIBLE_DEVICES, or "0".."n-1" for the GPUs the driver
    # shows when it is unset. Empty: no GPU visible.
    gpus: tuple[str, ...]
    cpus: tuple[int, ...]  # the cores this process may run on (its affinity mask)
    # Where torch's inductor keeps its compile cache when TMPDIR is the system's (None: the
    # environment sets TORCHINDUCTOR_CACHE_DIR already). Ranks get a TMPDIR of their own that is
    # removed at exit; this keeps the cache where vLLM would have put it, so starts stay warm.
    inductor_cache: str | None = None


@dataclasses.dataclass(frozen=True)
class RankSpec:
    rank: int
    port: int
    argv: tuple[str, ...]
    env: Mapping[str, str]  # set on top of the supervisor's own environment
    device_kind: DeviceKind  # CUDA or CPU, never AUTO
    devices: tuple[str, ...]  # GPU ids for CUDA ranks, core numbers for CPU ranks
    host: str = "127.0.0.1"  # where this machine reaches the rank (`Config.rank_host`)
    kv_events: RankEvents | None = None  # cache policy: where its KV events are read

    @property
    def devices_text(self) -> str:
        return ",".join(self.devices)

    @property
    def url(self) -> str:
        """The rank's base URL, as the supervisor reaches it: the one place it is built."""
        return f"http://{url_host(self.host)}:{self.port}"


def resolve_device_kind(config: Config, inventory: Inventory) -> DeviceKind:
    if config.device is not DeviceKind.AUTO:
        return config.device
    if config.devices is not None or inventory.gpus:
        return DeviceKind.CUDA
    return DeviceKind.CPU


def _gpu_pool(config: Config, inventory: Inventory) -> tuple[str, ...]:
    if config.devices is None:
        return inventory.gpus
    pool = []
    for index in config.devices:
        i = int(index)
        if i >= len(inventory.gpus):
            raise ConfigError(f"--devices {','.join(config.devices)}: device {i} is not visible "
                              f"({len(inventory.gpus)} GPU(s) visible)")
        pool.append(inventory.gpus[i])
    return tuple(pool)


def _split(pool: tuple, n: int, per_rank: int) -> list[tuple]:
    return [pool[i * per_rank:(i + 1) * per_rank] for i in range(n)]


def plan_devices(config: Config, inventory: Inventory) -> tuple[DeviceKind, list[tuple[str, ...]]]:
    kind = resolve_device_kind(config, inventory)
    n = config.dp_size_local
    if kind is DeviceKind.NONE:
        return kind, [() for _ in range(n)]
    if kind is DeviceKind.CUDA:
        per_rank = config.devices_per_rank
        pool = _gpu_pool(config, inventory)
        if n * per_rank > len(pool):
            raise ConfigError(f"{n} ranks x {per_rank} GPU(s) (tp x pp) need {n * per_rank} GPUs, "
                              f"but {len(pool)} are visible")
        return kind, _split(pool, n, per_rank)
    cpus = inventory.cpus
    if len(cpus) < n:  # shared round robin: rank i on core i mod cores
        return kind, [(str(cpus[i % len(cpus)]),) for i in range(n)]
    per_rank = len(cpus) // n
    return kind, [tuple(str(c) for c in group) for group in _split(cpus, n, per_rank)]


def core_sharing(config: Config, inventory: Inventory) -> str | None:
    """What it costs when CPU ranks outnumber the cores (a warning for the operator), else None."""
    n, cores = config.dp_size_local, len(inventory.cpus)
    if resolve_device_kind(config, inventory) is not DeviceKind.CPU or cores >= n:
        return None
    return (f"{n} CPU ranks share {cores} core(s) round robin (rank i on core i mod {cores}): up to "
            f"{-(-n // cores)} ranks compete for one core, so each runs that many times slower at best, "
            "and ranks sharing a core contend for its caches; use fewer ranks, more cores, or "
            "--device none to leave the placement to the ranks")


def run_tag(run_dir: str) -> str:
    """The run directory's name: unique to this run (pid and random bytes)."""
    return run_dir.rstrip("/").rsplit("/", 1)[-1]


def rank_dir(run_dir: str, rank: int) -> str:
    # Short on purpose: vLLM puts IPC sockets here, and a socket path has at most 107 bytes.
    return f"{run_dir}/rank{rank}"


def side_channel_ports(config: Config, rank: int, environ: Mapping[str, str]) -> dict[str, str]:
    """Replicas mode: each rank's own KV-transfer side-channel ports (the supervisor's environment
    sets the bases). dp mode: none, vLLM offsets them by the DP rank itself."""
    if config.mode is Mode.DP:
        return {}
    ports = {}
    for name, default, times_tp in SIDE_CHANNELS:
        text = environ.get(name, "")
        base = int(text) if text.isascii() and text.isdigit() else default
        ports[name] = str(base + rank * (config.server.positive_int("--tensor-parallel-size", 1) if times_tp else 1))
    return ports


TRACES_FLAG = "--otlp-traces-endpoint"  # vLLM's, and ours


def plan_ranks(config: Config, inventory: Inventory, run_dir: str | None = None,
               environ: Mapping[str, str] | None = None) -> tuple[RankSpec, ...]:
    """`run_dir`: the supervisor's scratch directory; each rank's temporary files (vLLM's IPC
    sockets, its vllm_dist_* files) go below it so they can be removed with it. `environ`: the
    supervisor's, for the side-channel base ports."""
    kind, device_groups = plan_devices(config, inventory)
    specs = []
    for rank, devices in enumerate(device_groups):
        port = config.port + rank
        argv = [*config.server_cmd, *config.child_args, "--host", config.host, "--port", str(port)]
        if config.mode is Mode.DP:
            argv += [
                "--data-parallel-size", str(config.dp_size),
                "--data-parallel-rank", str(config.data_parallel_start_rank + rank),
                "--data-parallel-size-local", "1",
                "--data-parallel-address", config.data_parallel_address,
                "--data-parallel-rpc-port", str(config.data_parallel_rpc_port),
            ]
        if config.otlp_traces_endpoint is not None and not config.server.present(TRACES_FLAG):
            argv += [TRACES_FLAG, config.otlp_traces_endpoint]  # its spans join the router's traces
        events = plan_events(config, rank, rank_dir(run_dir, rank) if run_dir is not None else None)
        if events is not None and events.config is not None:
            argv += [FLAG, events.config]
        env = {RANK_ENV: str(rank), **side_channel_ports(config, rank, environ or {})}
        if run_dir is not None:
            env[RUN_ENV] = run_tag(run_dir)
            env["TMPDIR"] = env["VLLM_RPC_BASE_PATH"] = rank_dir(run_dir, rank)
            if inventory.inductor_cache is not None:
                env["TORCHINDUCTOR_CACHE_DIR"] = inventory.inductor_cache
        if kind is DeviceKind.CUDA:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        elif kind is DeviceKind.CPU:
            # vLLM's CPU backend binds its OpenMP threads to these cores; the default ("auto")
            # puts every rank on the same cores. No core is held back for the framework.
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(devices)
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        specs.append(RankSpec(rank=rank, port=port, argv=tuple(argv), env=env,
                              device_kind=kind, devices=devices, host=config.rank_host, kv_events=events))
    return tuple(specs)


def router_settings(config: Config, specs: Sequence[RankSpec]) -> RouterSettings:
    """What a router worker is told: the configuration's, and where each rank's KV events are."""
    events = tuple((s.rank, s.kv_events.events, s.kv_events.replay) for s in specs if s.kv_events is not None)
    return dataclasses.replace(config.router_settings, kv_events=events)

