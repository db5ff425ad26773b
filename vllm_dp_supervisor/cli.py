"""`vllm-dp-supervisor` / `python -m vllm_dp_supervisor`: parse, check, run, exit with a code that says
what happened."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from vllm_dp_supervisor import dry_run, preflight, termination
from vllm_dp_supervisor.output.console import Console, ConsoleHandler
from vllm_dp_supervisor.output.json_log import JsonFormatter, rfc3339
from vllm_dp_supervisor.settings import exits, service_links
from vllm_dp_supervisor.settings.config import ENV_PREFIX, PROG, Config, ConfigError, LogFormat
from vllm_dp_supervisor.settings.options import parse_config, split_child_args
from vllm_dp_supervisor.settings.plan import Inventory, RankSpec, core_sharing, plan_ranks

log = logging.getLogger("supervisor")

# Every signal whose default would end the supervisor without its orderly stop, and SIGCHLD. The
# handler only queues; the supervisor dispatches to handle_<name> or logs that it ignores it:
# TERM, INT, HUP: stop (a second one kills at once); QUIT: stop, killing at once; USR1: /status
# to the log; USR2: debug logging on/off; ALRM, VTALRM, PROF, POLL, PWR, XCPU: ignored.
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGQUIT,
                   signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF,
                   signal.SIGPOLL, signal.SIGPWR, signal.SIGXCPU)


def _setup_logging(level: str, fmt: LogFormat) -> Console:
    """The supervisor's own lines go to stderr through a bounded queue and a writer thread: a
    stuck stderr (a log collector that stopped reading) must not freeze the event loop."""
    console = Console(sys.stderr.fileno(), what="log")
    handler = ConsoleHandler(console)
    if fmt is LogFormat.JSON:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s [supervisor] %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return console


def prepare(argv: Sequence[str], environ: dict[str, str]) -> tuple[Config, Inventory, tuple[RankSpec, ...], Path]:
    """Everything that can fail because of bad input, before anything starts. Raises ConfigError.
    Returns the config, the machine, the ranks, and the run directory (named, not yet created)."""
    config = parse_config(argv, environ)
    preflight.check_server_cmd(config, environ)
    preflight.check_tracing(config, environ)
    run_dir = preflight.choose_run_dir(config.dp_size_local, environ)
    inventory = preflight.detect_inventory(environ)
    specs = plan_ranks(config, inventory, str(run_dir), environ)
    preflight.check_rank_ports(config)
    return config, inventory, specs, run_dir


def make_run_dir(specs: Sequence[RankSpec]) -> None:
    for spec in specs:
        os.makedirs(spec.env["TMPDIR"], mode=0o700, exist_ok=True)


def _config_error(exc: ConfigError, argv: Sequence[str], environ: Mapping[str, str]) -> str:
    """The bad configuration's line, as JSON when JSON logs were asked for (a collector parses
    every line, this one first)."""
    fmt = termination.option_before_parsing(argv, environ, "--log-format", ENV_PREFIX + "LOG_FORMAT")
    if (fmt or "").strip().lower() != LogFormat.JSON.value:
        return f"{PROG}: error: {exc}"
    return json.dumps({"time": rfc3339(time.time()), "severity": "ERROR", "message": f"bad configuration: {exc}"})


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Before anything reads the environment, the ranks' included (they inherit os.environ).
    removed = service_links.injected(os.environ)
    for name in removed:
        del os.environ[name]
    environ = dict(os.environ)
    log_console: Console | None = None
    if argv[:1] == ["status"]:
        from vllm_dp_supervisor.status_cli import main as status_main
        return status_main(argv[1:], environ)
    if argv[:1] == ["check-manifests"]:
        from vllm_dp_supervisor.manifests import main as check_manifests_main
        return check_manifests_main(argv[1:])
    try:
        config, inventory, specs, run_dir = prepare(argv, environ)
        if "--dry-run" in split_child_args(argv)[0]:
            render = dry_run.render_json if config.log_format is LogFormat.JSON else dry_run.render_text
            sys.stdout.write(render(config, specs, removed))
            return 0
        log_console = _setup_logging(config.log_level, config.log_format)
        if removed:
            log.warning("%s", service_links.message(removed))
        admin_token = preflight.admin_token(config)
        log_dir = preflight.prepare_log_dir(config)
        api_sock = preflight.open_api_socket(config)
        router_sock = preflight.open_router_socket(config)
    except ConfigError as exc:
        if log_console is not None:
            log_console.close()
        print(_config_error(exc, argv, environ), file=sys.stderr)
        termination.write(termination.path_of(termination.option_before_parsing(argv, environ)),
                          f"exiting with code {exits.BAD_CONFIG}: bad configuration: {exc}\n")
        return exits.BAD_CONFIG
    make_run_dir(specs)
    if config.stop_budget != config.stop_timeout:
        log.info("--stop-timeout raised to %g s to cover the ranks' --shutdown-timeout", config.stop_budget)
    sharing = core_sharing(config, inventory)
    if sharing:
        log.warning("%s", sharing)
    router = "no router" if config.router_port is None else \
        f"router on {config.router_listen_host}:{config.router_port}"
    log.info("%d rank(s) of %r on ports %d-%d, %s mode; %s; API on %s:%d; rank logs in %s",
             len(specs), config.server_cmd[0], config.port, config.port + len(specs) - 1, config.mode.value,
             router, config.api_host, config.supervisor_port, log_dir or "none")
    try:
        # Imported here: fastapi, uvicorn and aiohttp take half a second, and a bad flag should be
        # answered before that.
        from vllm_dp_supervisor.supervisor import serve
        result = asyncio.run(serve(config, specs, api_sock, router_sock, run_dir, log_dir, admin_token,
                                   HANDLED_SIGNALS))
        termination.write(termination.path_of(config.termination_log), result.termination_message())
        return result.code
    finally:  # created here, removed here: after every rank's tree is gone, or if the run failed
        shutil.rmtree(run_dir, ignore_errors=True)
        log_console.close()  # the exit summary reaches stderr, if stderr moves within 2 s
