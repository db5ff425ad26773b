"""plan.py: ports, devices, argv and environment per rank. Pure, fast."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_dp_supervisor.settings.config import ConfigError, DeviceKind, reachable_host, url_host
from vllm_dp_supervisor.settings.options import parse_config
from vllm_dp_supervisor.settings.plan import Inventory, core_sharing, plan_ranks

GPUS8 = Inventory(gpus=tuple(str(i) for i in range(8)), cpus=(0, 1))


def plan(*argv: str, inventory: Inventory = GPUS8):
    return plan_ranks(parse_config(list(argv), {}), inventory)


def test_replicas_argv_appends_host_and_port_after_child_args():
    specs = plan("--dp-size-local", "2", "--port", "9000", "--host", "10.0.0.1", "--", "model", "--seed", "1")
    assert specs[1].argv == ("vllm", "serve", "model", "--seed", "1", "--host", "10.0.0.1", "--port", "9001")
    assert [s.port for s in specs] == [9000, 9001]
    assert [s.env["SUPERVISOR_LOCAL_RANK"] for s in specs] == ["0", "1"]


def test_dp_mode_adds_data_parallel_args():
    specs = plan("--dp-size-local", "2", "--mode", "dp", "--data-parallel-size", "16",
                 "--data-parallel-start-rank", "8", "--data-parallel-address", "head", "--", "moe")
    tail = specs[1].argv[specs[1].argv.index("--data-parallel-size"):]
    assert tail == ("--data-parallel-size", "16", "--data-parallel-rank", "9", "--data-parallel-size-local", "1",
                    "--data-parallel-address", "head", "--data-parallel-rpc-port", "29550")


def test_devices_are_relative_to_the_supervisors_visible_devices():
    inv = Inventory(gpus=("4", "5", "6", "7"), cpus=(0,))
    specs = plan("--dp-size-local", "2", "--", "m", "-tp", "2", inventory=inv)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["4,5", "6,7"]
    specs = plan("--dp-size-local", "2", "--devices", "3,1", inventory=inv)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["7", "5"]


def test_uuids_in_cuda_visible_devices_are_passed_as_they_are():
    inv = Inventory(gpus=("GPU-aaa", "GPU-bbb"), cpus=(0,))
    assert [s.devices for s in plan("--dp-size-local", "2", inventory=inv)] == [("GPU-aaa",), ("GPU-bbb",)]


def test_no_gpu_means_cpu_ranks_on_their_own_cores():
    inv = Inventory(gpus=(), cpus=(0, 1, 2, 3))
    specs = plan("--dp-size-local", "2", inventory=inv)
    assert all(s.device_kind is DeviceKind.CPU for s in specs)
    assert [s.env["VLLM_CPU_OMP_THREADS_BIND"] for s in specs] == ["0,1", "2,3"]
    assert all(s.env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0" for s in specs)
    assert all("CUDA_VISIBLE_DEVICES" not in s.env for s in specs)


def test_forced_cpu_with_gpus_visible():
    specs = plan("--dp-size-local", "2", "--device", "cpu")
    assert [s.env["VLLM_CPU_OMP_THREADS_BIND"] for s in specs] == ["0", "1"]


def test_cuda_forced_without_gpus_is_an_error():
    with pytest.raises(ConfigError, match="need 1 GPUs, but 0 are visible"):
        plan("--dp-size-local", "1", "--device", "cuda", inventory=Inventory(gpus=(), cpus=(0,)))


@given(n=st.integers(1, 8), tp=st.integers(1, 4), pp=st.integers(1, 2), visible=st.integers(0, 16))
def test_gpu_assignment_is_disjoint_and_complete(n, tp, pp, visible):
    inv = Inventory(gpus=tuple(f"g{i}" for i in range(visible)), cpus=(0,))
    argv = ["--dp-size-local", str(n), "--device", "cuda", "--", "m", "-tp", str(tp), "-pp", str(pp)]
    if n * tp * pp > visible:
        with pytest.raises(ConfigError, match="are visible"):
            plan(*argv, inventory=inv)
        return
    specs = plan(*argv, inventory=inv)
    used = [d for s in specs for d in s.devices]
    assert all(len(s.devices) == tp * pp for s in specs)
    assert len(used) == len(set(used)) == n * tp * pp


@given(n=st.integers(1, 8), cores=st.integers(1, 16))
def test_cpu_assignment_is_disjoint_or_shared_evenly(n, cores):
    inv = Inventory(gpus=(), cpus=tuple(range(cores)))
    specs = plan("--dp-size-local", str(n), inventory=inv)
    used = [d for s in specs for d in s.devices]
    assert all(s.devices for s in specs)
    if n <= cores:
        assert len(used) == len(set(used)) and core_sharing(parse_config(["--dp-size-local", str(n)], {}), inv) is None
    else:  # round robin: one core a rank, no core with two more ranks than another
        assert all(len(s.devices) == 1 for s in specs)
        counts = [used.count(str(c)) for c in range(cores)]
        assert max(counts) - min(counts) <= 1
        warning = core_sharing(parse_config(["--dp-size-local", str(n)], {}), inv)
        assert warning and f"{n} CPU ranks share {cores} core(s)" in warning


def test_device_none_assigns_nothing():
    specs = plan("--dp-size-local", "3", "--device", "none", inventory=Inventory(gpus=("0",), cpus=(0,)))
    for s in specs:
        assert s.devices == () and "CUDA_VISIBLE_DEVICES" not in s.env
        assert not any(k.startswith("VLLM_CPU") for k in s.env)


def test_a_rank_is_reached_where_it_listens_and_its_url_is_built_in_one_place():
    assert reachable_host("0.0.0.0") == "127.0.0.1" and reachable_host("::") == "::1"
    assert url_host("::1") == "[::1]" and url_host("10.1.2.3") == "10.1.2.3"
    assert [s.url for s in plan("--dp-size-local", "2", "--port", "9000")] == \
        ["http://127.0.0.1:9000", "http://127.0.0.1:9001"]
    assert plan("--dp-size-local", "1", "--host", "::", "--port", "9000")[0].url == "http://[::1]:9000"


def test_replicas_get_side_channel_ports_of_their_own_as_vllms_dp_ranks_would():
    """vLLM 0.32 offsets NIXL's side channel (5600) by the DP index: every replica has index 0, so
    two ranks with a NixlConnector on one host would both bind 5600."""
    config = parse_config(["--dp-size-local", "4", "--", "model", "-tp", "2"], {})
    specs = plan_ranks(config, GPUS8, environ={"VLLM_P2P_SIDE_CHANNEL_PORT": "7000"})
    assert [s.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] for s in specs] == ["5600", "5601", "5602", "5603"]
    assert [s.env["VLLM_P2P_SIDE_CHANNEL_PORT"] for s in specs] == ["7000", "7001", "7002", "7003"]
    assert [s.env["VLLM_MOONCAKE_BOOTSTRAP_PORT"] for s in specs] == ["8998", "9000", "9002", "9004"]  # x TP


def test_dp_ranks_leave_side_channels_to_vllm():
    specs = plan("--dp-size-local", "2", "--mode", "dp", "--", "moe")
    assert not [name for s in specs for name in s.env if "SIDE_CHANNEL" in name or "MOONCAKE" in name]


def test_the_ranks_send_their_spans_where_the_router_does_unless_told_otherwise():
    specs = plan("--dp-size-local", "2", "--otlp-traces-endpoint", "localhost:4317", "--", "model")
    assert specs[1].argv[-2:] == ("--otlp-traces-endpoint", "localhost:4317")
    own = plan("--dp-size-local", "1", "--otlp-traces-endpoint", "localhost:4317", "--", "model",
               "--otlp-traces-endpoint", "elsewhere:4317")
    assert own[0].argv.count("--otlp-traces-endpoint") == 1 and "elsewhere:4317" in own[0].argv
    assert "--otlp-traces-endpoint" not in plan("--dp-size-local", "1", "--", "model")[0].argv
