"""Installed as a user installs it, next to what vLLM brings.

vLLM depends on supervisord (PyPI `supervisor`), whose import package is `supervisor`. This
package once used that name too: the two merged into one directory, and from any directory but
the checkout the console script died with an ImportError. Here the project is installed
non-editable into a fresh venv that already holds `supervisor==4.3.0`, and both documented
commands run over the stand-in from another directory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from harness import ROOT, STANDIN_CMD, SupervisorRun, free_ports

SUPERVISORD = "supervisor==4.3.0"


def _pip(venv: Path, *args: str) -> None:
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                             "--disable-pip-version-check", *args],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("install") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    _pip(venv, SUPERVISORD)
    return venv


@pytest.fixture(scope="module")
def sdist_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files a source distribution holds, copied: pip builds in the tree it is given, and
    the checkout must not get a build/ directory from a test."""
    tree = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "vllm_dp_supervisor", tree / "vllm_dp_supervisor",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tree


def _site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def test_installing_next_to_supervisord_leaves_both_intact(venv: Path, sdist_tree: Path, tmp_path: Path) -> None:
    supervisord_files = {p.name: _digest(p) for p in (_site_packages(venv) / "supervisor").glob("*.py")}
    _pip(venv, str(sdist_tree))
    site = _site_packages(venv)
    assert (site / "vllm_dp_supervisor" / "cli.py").is_file()
    # supervisord's package is exactly what it was: no module of ours landed in it
    assert {p.name: _digest(p) for p in (site / "supervisor").glob("*.py")} == supervisord_files
    check = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import supervisor.supervisord, supervisor.events as e; print(e.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    # what the wheel installed: nothing at the top level but our own package
    listing = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "show", "-f", "vllm-dp-supervisor"],
                             capture_output=True, text=True, timeout=60).stdout
    installed = [line.strip() for line in listing.splitlines() if line.startswith("  ")]
    assert installed and not any(f.startswith("supervisor/") for f in installed), installed


@pytest.mark.parametrize("how", ["console script", "python -m"])
def test_installed_commands_run_from_another_directory(venv: Path, sdist_tree: Path, how: str, tmp_path: Path,
                                                        tag: str, base_env: dict[str, str], no_survivors: None) -> None:
    if not (_site_packages(venv) / "vllm_dp_supervisor").is_dir():
        _pip(venv, str(sdist_tree))
    command = [str(venv / "bin" / "vllm-dp-supervisor")] if how == "console script" else \
        [str(venv / "bin" / "python"), "-m", "vllm_dp_supervisor"]
    ports = free_ports(3)
    args = ["--dp-size-local", "2", "--port", str(ports[1]), "--supervisor-port", str(ports[0]),
            "--host", "127.0.0.1", "--server-cmd", STANDIN_CMD, "--", "m"]
    run = SupervisorRun(args, base_env, tag, tmp_path, command=command)
    try:
        run.wait_ready()
        # The router is a subpackage: it was installed too, and answers.
        with urllib.request.urlopen(f"http://127.0.0.1:{run.router_port}/v1/models", timeout=10) as r:
            assert json.load(r)["data"][0]["id"] == "m"
        run.send(signal.SIGTERM)
        assert run.wait_exit() == 0, run.output()
        assert "Error" not in run.output(), run.output()
    finally:
        run.close()
