"""The real-vLLM tests' fixtures: the models the project builds offline, and `vllm_run`, a supervisor
over real vLLM that fails the test on any process, IPC socket, vllm_dist_* file or /dev/shm
segment left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness import ROOT, assert_no_survivors, wait_for

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def tiny_model() -> str:
    if shutil.which("vllm", path=str(VENV_BIN)) is None:
        pytest.fail("vLLM's CPU build is not installed in this environment: run `make test`")
    out = subprocess.run([sys.executable, str(ROOT / "demo" / "build_model.py"), "tiny"], check=True,
                         stdout=subprocess.PIPE, text=True, timeout=300)
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def tiny_moe(tiny_model) -> str:
    """A random 2-expert Mixtral: vLLM's external data parallelism (dp mode) is for MoE models."""
    out = subprocess.run([sys.executable, str(ROOT / "demo" / "build_model.py"), "tiny-moe"], check=True,
                         stdout=subprocess.PIPE, text=True, timeout=300)
    return out.stdout.strip().splitlines()[-1]


def _tmp_entries() -> set[str]:
    return {e for e in os.listdir("/tmp") if e.startswith("vllm_dist_") or (len(e) == 36 and e.count("-") == 4)}


def _shm_entries() -> set[str]:
    return {e for e in os.listdir("/dev/shm") if e.startswith(("psm_", "sem.mp-"))}


@pytest.fixture
def vllm_run(start, base_env, tiny_model, tag):
    """start(n, *extra child args) → a supervisor over real vLLM on CPU cores (no GPU env)."""
    base_env.pop("CUDA_VISIBLE_DEVICES", None)
    base_env["PATH"] = f"{VENV_BIN}{os.pathsep}{base_env.get('PATH', '')}"
    base_env["HF_HUB_OFFLINE"] = "1"
    tmp_before, shm_before = _tmp_entries(), _shm_entries()

    runs = []

    def _start(n: int, *extra: str, options: list[str] | None = None, model: str | None = None,
               env: dict[str, str] | None = None):
        run = start(n, "--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory-bytes",
                    str(64 << 20), "--enforce-eager", *extra,
                    server_cmd="vllm serve", model=model or tiny_model, options=options, env=env)
        runs.append(run)
        return run

    yield _start
    for run in runs:  # before looking for leftovers: a failed test may have left it running
        run.close()
    assert_no_survivors(tag)
    wait_for(lambda: not (_shm_entries() - shm_before), 5, "vLLM's /dev/shm segments to be removed")
    assert not (_tmp_entries() - tmp_before), "vLLM left IPC sockets or vllm_dist_* files in /tmp"


