"""settings/config.py and options.py: parsing, environment precedence, every validation rule, and
the documented defaults. Pure, fast."""

from __future__ import annotations

import json

import pytest
from harness import ROOT
from hypothesis import given
from hypothesis import strategies as st

from vllm_dp_supervisor.settings.config import Config, ConfigError, DeviceKind, Mode, RestartPolicy
from vllm_dp_supervisor.settings.options import OPTIONS, parse_config, split_child_args


def parse(*argv: str, **env: str) -> Config:
    return parse_config(list(argv), env)


def test_defaults_match_the_documented_ones():
    c = parse("--dp-size-local", "4", "--", "Qwen/Qwen3-8B")
    assert (c.port, c.supervisor_port, c.host, c.server_cmd) == (8000, 9256, "0.0.0.0", ("vllm", "serve"))
    assert (c.probe_interval, c.probe_timeout, c.failure_threshold) == (1.0, 2.0, 3)
    assert (c.startup_timeout, c.stop_timeout, c.mode, c.device) == (1800.0, 30.0, Mode.REPLICAS, DeviceKind.AUTO)
    assert c.child_args == ("Qwen/Qwen3-8B",)
    assert list(c.rank_ports) == [8000, 8001, 8002, 8003]


@pytest.mark.parametrize("n,quorum", [(1, 1), (2, 1), (3, 2), (4, 2), (8, 4)])
def test_a_crashed_rank_restarts_and_the_pod_stays_ready_on_half_its_ranks_by_default(n, quorum):
    c = parse("--dp-size-local", str(n), "--", "m")
    assert (c.restart_policy, c.ready_quorum) == (RestartPolicy.ON_FAILURE, quorum)


def test_dp_mode_is_one_engine_so_by_default_the_pod_is_ready_only_with_every_rank():
    assert parse("--dp-size-local", "4", "--mode", "dp", "--", "m").ready_quorum == 4
    assert parse("--dp-size-local", "4", "--min-ready-ranks", "4", "--", "m").ready_quorum == 4
    assert parse("--dp-size-local", "4", "--restart-policy", "never", "--", "m").restart_policy \
        is RestartPolicy.NEVER


def test_every_option_has_an_environment_variable_and_the_command_line_wins():
    assert {o.env for o in OPTIONS} >= {"SUPERVISOR_DP_SIZE_LOCAL", "SUPERVISOR_PROBE_INTERVAL",
                                         "SUPERVISOR_STOP_TIMEOUT", "SUPERVISOR_SERVER_CMD"}
    c = parse("--probe-interval", "5", SUPERVISOR_DP_SIZE_LOCAL="2", SUPERVISOR_PROBE_INTERVAL="3",
              SUPERVISOR_SERVER_CMD="python -m vllm.entrypoints.cli.main serve")
    assert c.dp_size_local == 2 and c.probe_interval == 5.0
    assert c.server_cmd == ("python", "-m", "vllm.entrypoints.cli.main", "serve")


def test_child_args_pass_through_untouched():
    args = ["m", "--api-key", "x y", "--max-model-len=4096", "--", "odd"]
    c = parse("--dp-size-local", "1", "--", *args)
    assert list(c.child_args) == args


@pytest.mark.parametrize("argv,expected", [
    (["-tp", "2"], 2), (["--tensor-parallel-size", "4"], 4), (["--tensor-parallel-size=2", "-pp", "2"], 4),
    (["--pipeline-parallel-size=3"], 3), ([], 1), (["-tp", "2", "-tp", "1"], 1),
    # vLLM's parser accepts these too: once silently read as 1
    (["-tp=2"], 2), (["--tensor_parallel_size", "2", "-pp=2"], 4), (["--pipeline_parallel_size=2"], 2),
])
def test_devices_per_rank_from_tp_and_pp(argv, expected):
    assert parse("--dp-size-local", "1", "--", "m", *argv).devices_per_rank == expected


def test_tp_flag_without_value_is_an_error():
    with pytest.raises(ConfigError, match="needs a value"):
        parse("--dp-size-local", "1", "--", "m", "-tp")


def test_stop_timeout_default_is_raised_to_cover_vllm_shutdown_timeout():
    c = parse("--dp-size-local", "1", "--", "m", "--shutdown-timeout", "60")
    assert c.stop_budget == 65
    assert parse("--dp-size-local", "1").stop_budget == 30
    with pytest.raises(ConfigError, match="shorter than"):
        parse("--dp-size-local", "1", "--stop-timeout", "61", "--", "m", "--shutdown-timeout", "60")


def test_dp_size_defaults_to_local_size():
    c = parse("--dp-size-local", "4", "--mode", "dp")
    assert c.dp_size == 4


@given(n=st.integers(1, 300), port=st.integers(1, 65535), sport=st.integers(1, 65535))
def test_port_rules_hold_for_any_ports(n, port, sport):
    argv = ["--dp-size-local", str(n), "--port", str(port), "--supervisor-port", str(sport), "--router-port", "none"]
    if port + n - 1 > 65535:
        with pytest.raises(ConfigError, match="past 65535"):
            parse(*argv)
    elif port <= sport < port + n:
        with pytest.raises(ConfigError, match="inside the ranks' ports"):
            parse(*argv)
    else:
        c = parse(*argv)
        assert sport not in c.rank_ports and max(c.rank_ports) <= 65535


@given(size=st.integers(1, 64), local=st.integers(1, 16), start=st.integers(0, 64))
def test_dp_start_rank_rule(size, local, start):
    argv = ["--dp-size-local", str(local), "--mode", "dp", "--data-parallel-size", str(size),
            "--data-parallel-start-rank", str(start), "--port", "20000", "--supervisor-port", "9256"]
    if start + local > size:
        with pytest.raises(ConfigError, match="exceeds --data-parallel-size"):
            parse(*argv)
    else:
        assert parse(*argv).data_parallel_start_rank == start


@given(st.lists(st.text(min_size=1, max_size=8), max_size=6))
def test_split_child_args_keeps_everything_after_the_first_separator(tail):
    own, child = split_child_args(["--dp-size-local", "1", "--", *tail])
    assert own == ["--dp-size-local", "1"] and child == tail


@given(st.text(max_size=30))
def test_any_env_text_is_accepted_or_rejected_with_one_line_naming_the_variable(text):
    try:
        c = parse(SUPERVISOR_DP_SIZE_LOCAL="1", SUPERVISOR_PROBE_TIMEOUT=text)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("SUPERVISOR_PROBE_TIMEOUT=")
    else:
        assert 0 < c.probe_timeout < float("inf")


COMMAND_LINE = ROOT / "docs" / "command-line.md"


def test_the_docs_and_help_document_every_option():
    from vllm_dp_supervisor.settings.options import build_parser
    page = COMMAND_LINE.read_text()
    help_text = build_parser().format_help()
    for opt in OPTIONS:
        assert f"`{opt.flag} " in page or f"`{opt.flag}`" in page, opt.flag
        assert opt.env in page, opt.env
        assert opt.flag in help_text and f"[{opt.env}]" in help_text, opt.flag
        for alias in opt.aliases:
            assert f"`{alias}`" in page and alias in help_text, alias


def test_vllms_own_spellings_are_the_same_options():
    """What vLLM's serve and its DPSupervisor call --dp-size-local and --supervisor-port."""
    assert parse("--data-parallel-size-local", "3", "--data-parallel-supervisor-port", "9300") == \
        parse("--dp-size-local", "3", "--supervisor-port", "9300")
    with pytest.raises(ConfigError, match="expected one argument"):
        parse("--data-parallel-size-local")
    assert parse("-dpl", "3") == parse("--dp-size-local", "3")
    assert parse("-dpl", "2", "--mode", "dp", "-dp", "4", "-dpa", "10.0.0.1", "-dpr", "2", "-dpp", "13345") == \
        parse("--dp-size-local", "2", "--mode", "dp", "--data-parallel-size", "4", "--data-parallel-address",
              "10.0.0.1", "--data-parallel-start-rank", "2", "--data-parallel-rpc-port", "13345")


def test_node_rank_sets_the_start_rank():
    c = parse("--dp-size-local", "8", "--mode", "dp", "--data-parallel-size", "16", "--node-rank", "1")
    assert c.data_parallel_start_rank == 8
    with pytest.raises(ConfigError, match="exceeds --data-parallel-size 16"):
        parse("--dp-size-local", "8", "--mode", "dp", "--data-parallel-size", "16", "--node-rank", "2")
    with pytest.raises(ConfigError, match="not both"):
        parse("--dp-size-local", "8", "--mode", "dp", "--node-rank", "0", "--data-parallel-start-rank", "0")


def option_rows(text: str, default_column: int) -> dict[str, str]:
    """flag → the default shown in a Markdown table whose first cell is the option."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.replace("\\|", "/").strip().strip("|").split("|")]
        if len(cells) > default_column and cells[0].startswith("`--"):
            rows[cells[0].strip("`").split()[0]] = cells[default_column].strip("`")
    return rows


def test_the_docs_and_the_readme_show_the_defaults_config_has():
    """Defaults are written once, on Config; --help renders them, and the docs' full table and
    the README's short one must agree."""
    full = option_rows(COMMAND_LINE.read_text(), 2)
    short = option_rows((ROOT / "README.md").read_text(), 1)
    assert len(short) >= 10 and set(short) <= set(full)
    by_flag = {opt.flag: opt for opt in OPTIONS}
    for opt in OPTIONS:
        if opt.default_text is None and opt.default is not None:
            assert full[opt.flag] == opt.default, (opt.flag, full[opt.flag], opt.default)
    for flag, shown in short.items():
        assert shown == full[flag] or (shown == "required" and by_flag[flag].default is None), flag


def test_the_docs_list_every_exit_code_as_the_code_defines_it():
    from vllm_dp_supervisor.settings import exits
    page = (ROOT / "docs" / "operations.md").read_text()
    for code, meaning in exits.TABLE:
        assert f"| {code} | {meaning} |" in page, code


@pytest.mark.parametrize("url", ["http://collector:4318/v1/traces", "https://otel.example:443", "localhost:4317",
                                 "[::1]:4317", " http://127.0.0.1:4317 "])
def test_an_otlp_endpoint_is_a_url_or_host_and_port(url):
    assert parse("--dp-size-local", "1", "--otlp-traces-endpoint", url).otlp_traces_endpoint == url.strip()
    assert parse("--dp-size-local", "1").otlp_traces_endpoint is None


@pytest.mark.parametrize(("url", "why"), [
    ("collector", "must be http://HOST:PORT"), ("ftp://c:21", "must be http://HOST:PORT"), ("", "must be"),
    ("http://user:s3cret@collector:4318", "credentials go in OTEL_EXPORTER_OTLP_TRACES_HEADERS")])
def test_a_bad_otlp_endpoint_is_refused_without_echoing_it(url, why):
    with pytest.raises(ConfigError, match=why) as caught:
        parse("--dp-size-local", "1", "--otlp-traces-endpoint", url)
    assert "s3cret" not in str(caught.value)


def test_streams_continue_only_where_their_text_is_plain_text():
    def resumable(*server: str) -> bool:
        return parse_config(["--dp-size-local", "2", "--", *server], {}).router_settings.resume
    assert resumable("Qwen/Qwen3-8B")
    assert not resumable("Qwen/Qwen3-8B", "--reasoning-parser", "qwen3")
    assert not resumable("Qwen/Qwen3-8B", "--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    assert not resumable("Qwen/Qwen3-8B", "--structured-outputs-config", '{"reasoning_parser": "qwen3"}')
    assert not resumable("Qwen/Qwen3-8B", "--structured-outputs-config.reasoning_parser", "qwen3")
    assert not resumable("openai/gpt-oss-20b") and not resumable("/models/x", "--tokenizer", "openai/GPT-OSS-120b")
    forced = parse_config(["--dp-size-local", "2", "--", "m", "--enable-force-include-usage"], {})
    assert forced.router_settings.force_usage
    assert not parse_config(["--dp-size-local", "2"], {}).router_settings.force_usage
    dotted = parse_config(["--dp-size-local", "2", "--", "m", "--override-generation-config", '{"top_k": 5}',
                           "--override-generation-config.max_new_tokens", "100"], {})
    assert dotted.router_settings.model is not None
    override = dotted.router_settings.model.override_generation_config
    assert json.loads(override or "") == {"top_k": 5, "max_new_tokens": 100}
    for flags in (["--scheduling-policy", "priority"], ["--scheduling-policy=priority"]):
        assert parse_config(["--dp-size-local", "2", "--", "m", *flags], {}).router_settings.priority_scheduling
    assert not parse_config(["--dp-size-local", "2", "--", "m", "--scheduling-policy", "fcfs"],
                            {}).router_settings.priority_scheduling
