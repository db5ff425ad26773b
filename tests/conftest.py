"""The fixtures every test directory shares; the harness they use is harness.py."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import STANDIN_CMD, TAG_ENV, SupervisorRun, assert_no_survivors, free_ports
from hypothesis import settings

# No timed upper bound in a test: hypothesis's per-example deadline fails a property test when the
# machine is busy (two cores, other tests' processes). Speed goals live in `make bench`.
settings.register_profile("no-deadline", deadline=None)
settings.load_profile("no-deadline")


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def base_env(tag: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")}
    env[TAG_ENV] = tag
    env["TMPDIR"] = str(tmp_path)  # the default log dir and the run dir go here, not into /tmp
    env["CUDA_VISIBLE_DEVICES"] = "0,1,2,3,4,5,6,7"  # pretend GPUs: the stand-in ignores them
    env["PYTHONUNBUFFERED"] = "1"
    # Supervisors a test starts by hand get a router port of their own too (not 8080, which the
    # machine may use), and stop without the router's settle time.
    env["SUPERVISOR_ROUTER_PORT"] = str(free_ports(1)[0])
    env["SUPERVISOR_ROUTER_SETTLE"] = "0"
    return env


@pytest.fixture
def start(tag: str, base_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., SupervisorRun]]:
    """start(n, *child_args, options=[...], env={...}) → a running supervisor over the stand-in."""
    runs: list[SupervisorRun] = []

    def _start(n: int = 2, *child_args: str, options: list[str] | None = None,
               env: dict[str, str] | None = None, server_cmd: str = STANDIN_CMD,
               model: str = "standin-model") -> SupervisorRun:
        options = list(options or [])
        ports = free_ports(n + 2)
        # The router is on, as for users, on a port of its own; without the settle time a stop
        # takes (tests of it set it).
        router = [] if "--router-port" in options else ["--router-port", str(ports[-1])]
        settle = [] if "--router-settle" in options else ["--router-settle", "0"]
        # The stand-in's model has no files: its generation defaults are vLLM's neutral ones, as
        # --generation-config vllm tells the router (which reads them to continue a stream).
        neutral = ["--generation-config", "vllm"] if server_cmd == STANDIN_CMD and \
            "--generation-config" not in child_args else []
        args = ["--dp-size-local", str(n), "--port", str(ports[1]), "--supervisor-port", str(ports[0]),
                "--host", "127.0.0.1", "--server-cmd", server_cmd, *router, *settle, *options,
                "--", model, *child_args, *neutral]
        run = SupervisorRun(args, {**base_env, **(env or {})}, tag, tmp_path)
        runs.append(run)
        return run

    yield _start
    for run in runs:
        run.close()
    assert_no_survivors(tag)


@pytest.fixture
def no_survivors(tag: str) -> Iterator[None]:
    yield
    assert_no_survivors(tag)


