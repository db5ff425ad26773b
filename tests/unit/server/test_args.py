"""vllm_args.py: the server arguments read the way vLLM's own parser reads them. Pure, fast."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_dp_supervisor.server.args import ServerArgsError, read_server_args
from vllm_dp_supervisor.settings.config import ConfigError
from vllm_dp_supervisor.settings.options import parse_config


def read(*args: str, env: dict[str, str] | None = None, files: dict[str, str] | None = None):
    def read_text(path: str) -> str:
        if path not in (files or {}):
            raise FileNotFoundError(2, "No such file or directory", path)
        return (files or {})[path]
    return read_server_args(list(args), env or {}, read_text)


def test_last_occurrence_wins_in_every_spelling():
    server = read("m", "--max-model-len", "1", "--max_model_len=2", "--max-model-len", "3")
    assert server.value("--max-model-len") == "3"
    assert read("m", "-dpp=5").value("--data-parallel-rpc-port") == "5"
    assert read("m", "--ab=1").value("--a") is None


def test_config_yaml_is_read_and_the_command_line_wins():
    files = {"c.yaml": "tensor_parallel_size: 2\npipeline-parallel-size: 2\nenable-fault-tolerance: true\n"}
    server = read("m", "--config", "c.yaml", env={}, files=files)
    assert server.devices_per_rank == 4 and server.fault_tolerance
    assert read("m", "--config", "c.yaml", "-tp", "1", files=files).devices_per_rank == 2
    assert read("m", "--config=c.yaml", files=files).devices_per_rank == 4


@pytest.mark.parametrize("text,message", [
    ("tp: [", "not valid YAML at line 1"), ("- a\n- b\n", "must be a mapping"),
])
def test_bad_config_files_are_named(text, message):
    with pytest.raises(ServerArgsError, match=message):
        read("m", "--config", "c.yaml", files={"c.yaml": text})


def test_missing_config_file_and_wrong_suffix():
    with pytest.raises(ServerArgsError, match=r"only \.yaml"):
        read("m", "--config", "c.json")
    with pytest.raises(ConfigError, match=r"--config /nonexistent\.yaml: No such file"):
        parse_config(["--dp-size-local", "1", "--", "m", "--config", "/nonexistent.yaml"], {})


def test_api_key_from_args_config_or_environment():
    assert read("m", "--api-key", "k1", "k2", "--port-x", "1").api_key == "k1"
    assert read("m", "--api-key=k3").api_key == "k3"
    assert read("m", "--api_key", "k4").api_key == "k4"
    assert read("m", "--config", "c.yml", files={"c.yml": "api-key: k5\n"}).api_key == "k5"
    assert read("m", env={"VLLM_API_KEY": "k6"}).api_key == "k6"
    assert read("m", "--api-key", "k7", env={"VLLM_API_KEY": "k6"}).api_key == "k7"  # vLLM: the flag wins
    assert read("m").api_key is None


def test_a_positional_model_wins_over_model_as_in_vllm_serve():
    assert read("a", "--model", "b").model == "a" and read("--model", "b").model == "b"


def test_every_served_model_name_is_read_the_last_flag_winning():
    assert read("m", "--served-model-name", "a", "b", "--port", "1").served_names == ("a", "b")
    assert read("m", "--served-model-name=c").served_names == ("c",)
    assert read("m", "--served-model-name", "a", "--served-model-name", "d").served_names == ("d",)
    assert read("m").served_names == ()
    config = parse_config(["--dp-size-local", "1", "--", "org/model", "--served-model-name", "x", "y"], {})
    assert config.model_source is not None and config.model_source.names == ("x", "y")
    assert parse_config(["--dp-size-local", "1", "--", "org/model"], {}).model_source.names == ("org/model",)


def test_the_api_key_is_never_in_a_repr():
    server = read("m", "--api-key", "sk-secret-123")
    config = parse_config(["--dp-size-local", "1", "--", "m", "--api-key", "sk-secret-123"], {})
    assert "sk-secret-123" not in repr(server).replace("('--api-key', 'sk-secret-123')", "")
    assert config.server.api_key == "sk-secret-123"


@pytest.mark.parametrize("args,message", [
    (["-dp", "2"], "--data-parallel-size has no place in replicas mode"),
    (["--data_parallel_size=2"], "--data-parallel-size has no place in replicas mode"),
    (["-dpn", "1"], "--data-parallel-rank has no place in replicas mode"),
    (["-tp"], "--tensor-parallel-size needs a value"),
    (["-tp=two"], "must be a positive integer"),
    (["--port=9000"], "--port is set by the supervisor"),
])
def test_server_arguments_the_supervisor_refuses(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(["--dp-size-local", "1", "--", "m", *args], {})


def test_dp_flags_in_a_config_file_are_refused_in_dp_mode(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data-parallel-rank: 3\n")
    with pytest.raises(ConfigError, match="--data-parallel-rank is set by the supervisor in dp mode"):
        parse_config(["--dp-size-local", "1", "--mode", "dp", "--", "m", "--config", str(path)], {})


@given(st.lists(st.text(min_size=0, max_size=12), max_size=12))
def test_any_arguments_either_read_or_raise_a_one_line_error(args):
    try:
        read(*args)
    except ServerArgsError as exc:
        assert "\n" not in str(exc)
