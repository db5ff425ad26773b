"""Bad input: exit 2 with one clear line on stderr, before anything starts."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest
from harness import STANDIN_CMD, SUPERVISOR, free_ports, tagged_processes


def run_cli(args: list[str], env: dict[str, str], timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run([*SUPERVISOR, *args], env=env, cwd="/",
                          capture_output=True, text=True, timeout=timeout)


def assert_config_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vllm-dp-supervisor: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def ports() -> list[int]:
    return free_ports(5)


def base(ports: list[int], n: int = 2) -> list[str]:
    return ["--dp-size-local", str(n), "--port", str(ports[1]), "--supervisor-port", str(ports[0]),
            "--host", "127.0.0.1", "--server-cmd", STANDIN_CMD]


CASES = [
    ("missing dp size", lambda p: ["--port", str(p[1])], {}, ["--dp-size-local is required"]),
    ("zero ranks", lambda p: ["--dp-size-local", "0"], {}, ["--dp-size-local='0'", "at least 1"]),
    ("not a number", lambda p: ["--dp-size-local", "four"], {}, ["--dp-size-local='four'", "must be a number"]),
    ("bad env value", lambda p: base(p), {"SUPERVISOR_PROBE_INTERVAL": "soon"},
     ["SUPERVISOR_PROBE_INTERVAL='soon'", "must be a number"]),
    ("negative timeout", lambda p: base(p) + ["--probe-timeout", "-1"], {}, ["--probe-timeout", "positive"]),
    ("nan interval", lambda p: base(p) + ["--probe-interval", "nan"], {}, ["--probe-interval", "positive"]),
    ("supervisor port in rank range", lambda p: base(p)[:-6] + ["--supervisor-port", str(p[2]), "--host",
     "127.0.0.1", "--server-cmd", STANDIN_CMD], {}, ["inside the ranks' ports"]),
    ("router port in rank range", lambda p: base(p) + ["--router-port", str(p[2])], {},
     ["--router-port", "inside the ranks' ports"]),
    ("router port is the supervisor's", lambda p: base(p) + ["--router-port", str(p[0])], {},
     ["--router-port", "also --supervisor-port"]),
    ("router port not a port", lambda p: base(p) + ["--router-port", "eighty"], {}, ["--router-port='eighty'"]),
    ("ports past 65535", lambda p: ["--dp-size-local", "4", "--port", "65534"], {}, ["past 65535"]),
    ("unknown option", lambda p: base(p) + ["--probe-intervall", "1"], {},
     ["unrecognized arguments: --probe-intervall"]),
    ("model without --", lambda p: base(p) + ["Qwen/Qwen3-8B"], {}, ["after --"]),
    ("server cmd missing", lambda p: base(p)[:-1] + ["no-such-vllm-binary serve"], {},
     ["'no-such-vllm-binary' was not found on PATH"]),
    ("too many devices", lambda p: base(p, 3) + ["--", "m", "-tp", "4"], {"CUDA_VISIBLE_DEVICES": "0,1,2,3"},
     ["need 12 GPUs, but 4 are visible"]),
    ("device not visible", lambda p: base(p) + ["--devices", "2,7"], {"CUDA_VISIBLE_DEVICES": "4,5,6,7"},
     ["device 7 is not visible"]),
    ("dp start rank overflow", lambda p: base(p) + ["--mode", "dp", "--data-parallel-size", "4",
     "--data-parallel-start-rank", "3"], {}, ["exceeds --data-parallel-size 4"]),
    ("dp flag in replicas mode", lambda p: base(p) + ["--data-parallel-size", "4"], {}, ["only applies to --mode dp"]),
    ("child sets --port", lambda p: base(p) + ["--", "m", "--port", "9000"], {}, ["--port is set by the supervisor"]),
    ("dp child sets dp rank", lambda p: base(p) + ["--mode", "dp", "--", "m", "--data-parallel-rank=1"], {},
     ["--data-parallel-rank is set by the supervisor in dp mode"]),
    ("stop timeout below shutdown timeout", lambda p: base(p) + ["--stop-timeout", "10", "--", "m",
     "--shutdown-timeout", "30"], {}, ["--stop-timeout 10 is shorter than", "--shutdown-timeout 30"]),
    ("bad tp", lambda p: base(p) + ["--", "m", "--tensor-parallel-size", "two"], {},
     ["--tensor-parallel-size must be a positive integer"]),
    ("bad mode", lambda p: base(p) + ["--mode", "pipeline"], {}, ["must be one of replicas, dp"]),
    ("unbalanced quotes", lambda p: base(p)[:-1] + ["vllm 'serve"], {}, ["cannot be split"]),
    ("unwritable log dir", lambda p: base(p) + ["--log-dir", "/proc/no-such-dir"], {},
     ["--log-dir /proc/no-such-dir: cannot write"]),
    ("tee beyond ranks", lambda p: base(p) + ["--tee", "0,5"], {}, ["--tee lists rank 5"]),
    ("bad tee", lambda p: base(p) + ["--tee", "some"], {}, ["--tee='some'"]),
    ("run id with a slash", lambda p: base(p) + ["--run-id", "a/b"], {}, ["--run-id='a/b'"]),
    ("tiny log size", lambda p: base(p) + ["--log-max-bytes", "10"], {}, ["at least 4096"]),
    ("bad log format", lambda p: base(p) + ["--log-format", "xml"], {}, ["one of text, json"]),
    ("devices with device none", lambda p: base(p) + ["--device", "none", "--devices", "0"], {},
     ["--devices lists GPUs; it cannot be used with --device none"]),
]


@pytest.mark.parametrize("name,args,env,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(name, args, env, needles, ports, base_env, tag):
    result = run_cli(args(ports), {**base_env, **env})
    assert_config_error(result, *needles)
    assert not tagged_processes(tag)


def test_rank_port_taken_names_the_listener(ports, base_env, tag):
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", ports[2]))
        squatter.listen()
        result = run_cli(base(ports), base_env)
    assert_config_error(result, f"port {ports[2]} (rank 1) is already in use", "pid ")
    assert not tagged_processes(tag)


def test_supervisor_port_taken(ports, base_env, tag):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports[0]))
        squatter.listen()
        result = run_cli(base(ports), base_env)
    assert_config_error(result, f"--supervisor-port {ports[0]} is already in use")
    assert not tagged_processes(tag)


def test_router_port_taken(ports, base_env, tag):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports[4]))
        squatter.listen()
        result = run_cli([*base(ports), "--router-port", str(ports[4])], base_env)
    assert_config_error(result, f"--router-port {ports[4]} is already in use", "(or --router-port none)")
    assert not tagged_processes(tag)


def test_help_documents_options_and_their_environment_variables(base_env):
    result = run_cli(["--help"], base_env)
    assert result.returncode == 0
    for text in ("--dp-size-local", "[SUPERVISOR_DP_SIZE_LOCAL]", "--probe-interval",
                 "[SUPERVISOR_PROBE_INTERVAL]", "--stop-timeout", "Exit codes"):
        assert text in result.stdout


def test_a_rejected_command_line_still_writes_the_termination_message(tmp_path):
    message = tmp_path / "termination-log"
    result = subprocess.run([*SUPERVISOR, "--dp-size-local", "two",
                             "--termination-log", str(message)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert message.read_text() == ("exiting with code 2: bad configuration: --dp-size-local='two': "
                                   "must be a number\n")


@pytest.mark.parametrize("how", [["--log-format", "json"], ["--log-format=json"], "env"])
def test_with_json_logs_asked_for_a_bad_configuration_is_one_json_line(tmp_path, how):
    """A log collector parses every line: the first one too."""
    env = {"PATH": "/usr/bin:/bin", **({"SUPERVISOR_LOG_FORMAT": "json"} if how == "env" else {})}
    flags = [] if how == "env" else how
    result = subprocess.run([*SUPERVISOR, *flags, "--dp-size-local", "two"], capture_output=True, text=True,
                            cwd=tmp_path, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    record = json.loads(lines[0])
    assert record["severity"] == "ERROR" and record["message"] == \
        "bad configuration: --dp-size-local='two': must be a number"
