"""demo/demo.py, over the stand-in: the script behind `make demo` works end to end."""

from __future__ import annotations

import subprocess
import sys

from harness import ROOT, free_ports


def test_demo_over_the_standin(base_env, tmp_path, no_survivors):
    ports = free_ports(4)
    result = subprocess.run([sys.executable, str(ROOT / "demo" / "demo.py"), "--standin",
                             "--supervisor-port", str(ports[0]), "--port", str(ports[1]),
                             "--router-port", str(ports[3]),
                             "--log", str(tmp_path / "demo.log")],
                            env=base_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "/ready answered 200" in out
    for rank, port in enumerate(ports[1:3]):
        assert f"| {rank}    | {port} |" in out
    answered = [line.split("|")[3].strip() for line in out.splitlines()
                if line.startswith(("| chat ", "| completion "))]
    assert sorted(answered) == ["0", "0", "1", "1"]  # two at a time: each pair on both ranks
    assert out.count("Hello from the stand-in.") == 2
    assert '"ready": true' in out
    assert "supervisor exited with 0" in out and "exiting with code 0: SIGTERM received" in out
