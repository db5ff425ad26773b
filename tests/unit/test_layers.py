"""The folder is the architecture: which package may import which (an `ast` walk over every import
of the package, lazy ones included), what importing the core loads, and a top level kept small.
ARCHITECTURE.md has the same table in words."""

from __future__ import annotations

import ast
import json
import socket
import subprocess
import sys
from pathlib import Path

from harness import ROOT

from vllm_dp_supervisor.router import protocol
from vllm_dp_supervisor.settings.options import parse_config

PACKAGE = "vllm_dp_supervisor"
# package → the packages it may import besides itself (and the standard library, and third-party
# libraries where its contract allows them). Modules at the top level (cli, supervisor, ...) may
# import anything; no package imports them.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "server": frozenset(),
    "settings": frozenset({"server"}),
    "core": frozenset({"settings", "server"}),
    "output": frozenset({"settings", "server"}),
    "procs": frozenset({"settings", "server", "output"}),
    "api": frozenset({"core", "settings", "server"}),
    "loops": frozenset({"core", "procs", "output", "settings", "server"}),
    "kvcache": frozenset({"settings"}),
    "router": frozenset({"settings", "server", "kvcache"}),
    "router_workers": frozenset({"core", "loops", "procs", "settings", "server", "router"}),
    "manifests": frozenset({"api", "core", "loops", "settings", "server"}),
}
# What `import vllm_dp_supervisor.core` (every module of it) must not load: the core is the
# standard library, the settings and vLLM's pure facts.
NOT_IN_THE_CORE = ("aiohttp", "psutil", "prometheus_client", "fastapi", "uvicorn", "ctypes", "httptools")
TOP_LEVEL_MODULES = 10
# What a router worker process must never load: the supervisor's side.
NOT_IN_A_WORKER = ("core", "loops", "procs", "api", "router_workers")


def imports_of(path: Path, module: str) -> set[str]:
    """The package's modules `path` imports, absolute, lazy imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith(PACKAGE + ".")}


def layer_of(module: str) -> str | None:
    """The package a module belongs to; None for the top level."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else None


def violations(root: Path) -> list[str]:
    """Every import that breaks MAY_IMPORT, as 'importer -> imported'."""
    found = []
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        own = layer_of(module) if parts[-1] != "__init__" or len(parts) > 2 else None
        if own is None:
            continue
        for target in sorted(imports_of(path, module)):
            theirs = layer_of(target) if target.count(".") >= 1 else None
            if target.count(".") == 1 and (root / PACKAGE / target.split(".")[1]).is_dir():
                theirs = target.split(".")[1]  # `from vllm_dp_supervisor import core`
            if theirs == own:
                continue
            if theirs is None or theirs not in MAY_IMPORT[own]:
                found.append(f"{module} -> {target}")
    return found


def test_every_package_imports_only_the_layers_below_it():
    assert set(MAY_IMPORT) == {p.name for p in (ROOT / PACKAGE).iterdir() if (p / "__init__.py").exists()}
    assert violations(ROOT) == []


def test_an_upward_import_is_caught(tmp_path):
    """The check itself can fail: the core reaching a process tree, and procs reaching the core."""
    for package in MAY_IMPORT:
        (tmp_path / PACKAGE / package).mkdir(parents=True)
        (tmp_path / PACKAGE / package / "__init__.py").write_text("")
    (tmp_path / PACKAGE / "core" / "machine.py").write_text(
        "def later():\n    from vllm_dp_supervisor.procs.process import RankProcess\n")
    (tmp_path / PACKAGE / "procs" / "process.py").write_text("from ..core import machine\n")
    (tmp_path / PACKAGE / "settings" / "config.py").write_text("from vllm_dp_supervisor import cli\n")
    assert violations(tmp_path) == [
        "vllm_dp_supervisor.core.machine -> vllm_dp_supervisor.procs.process",
        "vllm_dp_supervisor.core.machine -> vllm_dp_supervisor.procs.process.RankProcess",
        "vllm_dp_supervisor.procs.process -> vllm_dp_supervisor.core",
        "vllm_dp_supervisor.procs.process -> vllm_dp_supervisor.core.machine",
        "vllm_dp_supervisor.settings.config -> vllm_dp_supervisor.cli",
    ]


def test_importing_the_core_loads_no_io_library():
    core = sorted(p.stem for p in (ROOT / PACKAGE / "core").glob("*.py") if p.stem != "__init__")
    code = (f"import sys\nimport {', '.join(f'{PACKAGE}.core.{m}' for m in core)}\n"
            f"print(' '.join(m for m in {NOT_IN_THE_CORE!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.split() == []


WORKER = """
import atexit, json, sys
def loaded():
    with open(sys.argv[1], "w") as out:
        json.dump(sorted(sys.modules), out)
atexit.register(loaded)
from vllm_dp_supervisor.router.worker import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_real_router_worker_loads_nothing_of_the_supervisor_s_side(tmp_path):
    """Imports are not what a process loads (a lazy import, a package's __init__): a worker is
    started as the supervisor starts one, serves a request, drains, and says what it loaded."""
    listen = socket.create_server(("127.0.0.1", 0))
    ours, theirs = socket.socketpair()
    out = tmp_path / "modules.json"
    settings = parse_config(["--dp-size-local", "1", "--router-queue-timeout", "0.05"], {}).router_settings
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(out), "--listen-fd", str(listen.fileno()),
                               "--channel-fd", str(theirs.fileno())], pass_fds=(listen.fileno(), theirs.fileno()))
    try:
        theirs.close()
        ours.sendall(protocol.settings_message(settings) + protocol.view_message(1, [], []))
        with socket.create_connection(listen.getsockname(), timeout=30) as client:
            client.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 15\r\n\r\n"
                           b'{"prompt": "x"}')
            assert client.recv(4096).startswith(b"HTTP/1.1 503")  # no rank ready: the whole passage ran
        ours.sendall(protocol.drain_message(1.0))
        assert worker.wait(timeout=60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        ours.close()
        listen.close()
    loaded = json.loads(out.read_text())
    assert f"{PACKAGE}.router.passage" in loaded
    assert [m for m in loaded if m.split(".")[0] == PACKAGE and len(m.split(".")) > 1
            and m.split(".")[1] in NOT_IN_A_WORKER] == []
    assert "prometheus_client" not in loaded


def test_the_top_level_is_a_handful_of_modules():
    top = sorted(p.name for p in (ROOT / PACKAGE).glob("*.py"))
    assert len(top) <= TOP_LEVEL_MODULES, top


def test_architecture_md_has_a_row_for_every_module():
    page = (ROOT / "ARCHITECTURE.md").read_text()
    modules = [p for p in (ROOT / PACKAGE).rglob("*.py") if p.stem not in ("__init__", "__main__")]
    assert [str(p.relative_to(ROOT)) for p in modules if f"| `{p.name}` |" not in page] == []
