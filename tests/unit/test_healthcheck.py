"""healthcheck.py: the port a HEALTHCHECK asks, read from the supervisor's own command line and
environment in /proc (a fake /proc here)."""

from __future__ import annotations

import os
from pathlib import Path

from vllm_dp_supervisor.healthcheck import DEFAULT_PORT, is_supervisor, port_in, supervisor_port


def process(proc: Path, pid: int, argv: list[str], environ: dict[str, str] | None = None) -> None:
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    if environ is not None:
        (proc / str(pid) / "environ").write_bytes(b"\0".join(f"{k}={v}".encode() for k, v in environ.items()))


def test_the_flag_wins_over_the_environment_and_the_ranks_arguments_are_not_ours():
    assert port_in(["python3", "-m", "vllm_dp_supervisor", "--supervisor-port", "9300"],
                   {"SUPERVISOR_SUPERVISOR_PORT": "9400"}) == "9300"
    assert port_in(["x", "--data-parallel-supervisor-port=9301"], {}) == "9301"
    assert port_in(["x", "--", "model", "--supervisor-port", "1"], {"SUPERVISOR_SUPERVISOR_PORT": "9400"}) == "9400"
    assert port_in(["x"], {}) is None
    # a Service named `supervisor-supervisor` would set it to a URI: the supervisor drops it, so do we
    assert port_in(["x"], {"SUPERVISOR_SUPERVISOR_PORT": "tcp://10.96.0.9:9256"}) is None


def test_a_supervisor_is_known_by_how_it_is_started():
    assert is_supervisor(["python3", "-m", "vllm_dp_supervisor", "--dp-size-local", "2"])
    assert is_supervisor(["/usr/local/bin/vllm-dp-supervisor", "--dp-size-local", "2"])
    assert not is_supervisor(["python3", "-m", "vllm_dp_supervisor.healthcheck"])
    assert not is_supervisor(["python3", "-m", "vllm_dp_supervisor.router.worker"])
    assert not is_supervisor(["vllm", "serve", "m"])
    assert not is_supervisor([])


def test_pid_1_first_then_the_first_supervisor_else_our_environment(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    assert supervisor_port(proc, {}) == DEFAULT_PORT
    assert supervisor_port(proc, {"SUPERVISOR_SUPERVISOR_PORT": "9500"}) == "9500"
    process(proc, 1, ["/sbin/tini", "--", "python3", "-m", "vllm_dp_supervisor"])  # docker run --init
    process(proc, 7, ["python3", "-m", "vllm_dp_supervisor", "--supervisor-port", "9301"])
    process(proc, 9, ["vllm", "serve", "m", "--port", "8000"])
    (proc / "self").mkdir()
    assert supervisor_port(proc, {"SUPERVISOR_SUPERVISOR_PORT": "9500"}) == "9301"


def test_its_own_environment_is_read_when_its_command_line_says_nothing(tmp_path):
    proc = tmp_path / "proc"
    process(proc, 1, ["python3", "-m", "vllm_dp_supervisor"], {"SUPERVISOR_SUPERVISOR_PORT": "9302", "HF_TOKEN": "x"})
    process(proc, 5, ["python3", "-m", "vllm_dp_supervisor", "--supervisor-port", "9999"])
    assert supervisor_port(proc, {}) == "9302"  # PID 1 is the container's supervisor


def test_this_process_is_never_taken_for_the_supervisor(tmp_path):
    proc = tmp_path / "proc"
    process(proc, os.getpid(), ["python3", "-m", "vllm_dp_supervisor", "--supervisor-port", "1"])
    assert supervisor_port(proc, {}) == DEFAULT_PORT
