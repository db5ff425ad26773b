"""Installed as a user installs it, next to what vLLM brings.

vLLM depends on supervisord (PyPI `supervisor`), whose import package is `supervisor`. This
package once used that name too: the two merged into one directory, and from any directory but
the checkout the console script died with an ImportError. Here the project is installed
non-editable into a fresh venv that already holds `supervisor==4.3.0`, and both documented
commands run over the stand-in from another directory.
"""

from __future__ import annotations

import email.parser
import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import tomllib
import urllib.request
import zipfile
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


def test_a_release_is_one_step_away_its_sdist_and_wheel_build_and_pass_twine_check(
        sdist_tree: Path, tmp_path: Path) -> None:
    """What `make dist` builds and PyPI would be sent: both archives pass `twine check --strict`
    (the README renders as the long description), and the wheel says what the package needs."""
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(sdist_tree)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    archives = sorted(dist.iterdir(), key=lambda p: p.suffix)  # the sdist (.tar.gz), then the wheel
    assert [p.suffix for p in archives] == [".gz", ".whl"], archives
    checked = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, archives)],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0 and checked.stdout.count("PASSED") == 2, checked.stdout + checked.stderr
    with zipfile.ZipFile(archives[1]) as wheel:
        names = wheel.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(wheel.read(info).decode())
        entry_points = wheel.read(info.replace("METADATA", "entry_points.txt")).decode()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert (metadata["Name"], metadata["Version"]) == (project["name"], project["version"])
    assert metadata["Requires-Python"] == project["requires-python"]
    assert metadata["License-Expression"] == project["license"]
    assert metadata["Description-Content-Type"] == "text/markdown"
    needs = {re.split(r"[<>=;\[ ]", r)[0] for r in metadata.get_all("Requires-Dist", []) if "extra ==" not in r}
    assert needs == {re.split(r"[<>=\[ ]", r)[0] for r in project["dependencies"]}
    assert "vllm-dp-supervisor = vllm_dp_supervisor.cli:main" in entry_points
    # nothing at the top level but our package and its metadata (vLLM's supervisord owns `supervisor/`)
    assert {n.split("/")[0] for n in names} == {"vllm_dp_supervisor", info.split("/")[0]}
    assert {"vllm_dp_supervisor/procs/guardian.py", "vllm_dp_supervisor/router/worker.py"} <= set(names)
