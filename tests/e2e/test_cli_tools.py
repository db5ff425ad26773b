"""The command line's other verbs: --dry-run (check and show, start nothing) and `status`."""

from __future__ import annotations

import json
import signal
import subprocess

from harness import NEVER, STANDIN_CMD, SUPERVISOR, free_ports, tagged_processes, wait_for
from kubelet_env import OLD_SERVICES


def supervisor(*argv: str, env: dict, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([*SUPERVISOR, *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_dry_run_shows_each_rank_redacts_secrets_and_starts_nothing(base_env, tmp_path, tag):
    port = free_ports(1)[0]
    env = {**base_env, "SUPERVISOR_ADMIN_TOKEN": "adm1n-s3cret"}
    result = supervisor("--dp-size-local", "2", "--port", str(port), "--server-cmd", STANDIN_CMD, "--device", "cpu",
                        "--dry-run", "--", "model", "--api-key", "sk-s3cret", "other-key", "--hf-token=hf_s3cret",
                        "--max-model-len", "64", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "dry run: 2 rank(s) in replicas mode; nothing was started" in out
    assert f"rank 1: port {port + 1}, devices cpu " in out
    assert "--api-key '<redacted>' '<redacted>' '--hf-token=<redacted>' --max-model-len 64" in out
    assert "VLLM_NIXL_SIDE_CHANNEL_PORT=5601" in out
    assert "s3cret" not in out + result.stderr
    assert tagged_processes(tag) == []  # no rank, no guardian
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("vdps-", "vllm-dp-supervisor"))]  # no dirs


def test_dry_run_as_json_and_a_bad_flag_still_fails(base_env, tmp_path):
    env = {**base_env, **OLD_SERVICES}  # SUPERVISOR_PORT=tcp://... read as --port would exit 2
    ok = supervisor("--dp-size-local", "1", "--server-cmd", STANDIN_CMD, "--device", "none", "--log-format", "json",
                    "--dry-run", "--", "m", env=env, cwd=tmp_path)
    plan = json.loads(ok.stdout)
    assert plan["ranks"][0]["argv"][-4:-2] == ["--host", "0.0.0.0"] and plan["ranks"][0]["device_kind"] == "none"
    assert plan["removed_from_environment"] == sorted(OLD_SERVICES)  # every link of those Services
    assert "VLLM_PORT" not in plan["ranks"][0]["env"]
    bad = supervisor("--dp-size-local", "1", "--probe-interval", "soon", "--dry-run", env=base_env, cwd=tmp_path)
    assert bad.returncode == 2 and "--probe-interval='soon'" in bad.stderr and bad.stdout == ""


def test_status_shows_a_running_supervisors_ranks(start, base_env, tmp_path):
    token = "st4tus-t0ken"
    run = start(2, "--standin-unhealthy-after", "0.5", "--standin-ignore-sigterm", "--standin-ranks", "1",
                options=[*NEVER, "--probe-interval", "0.2", "--stop-timeout", "3"],
                env={"SUPERVISOR_ADMIN_TOKEN": token})
    status = run.wait_ready()
    env = {**base_env, "SUPERVISOR_SUPERVISOR_PORT": str(run.supervisor_port)}
    shown = supervisor("status", env=env, cwd=tmp_path)
    assert shown.returncode in (0, 1), shown.stderr  # ready, or rank 1 has already failed
    header, columns, *rows = shown.stdout.splitlines()
    assert header.startswith(("ready: 2 of 2 rank(s) serving (needs 1)", "not ready: 1 of 2"))
    assert columns.split()[:6] == ["rank", "state", "pid", "port", "restarts", "inflight"]
    rank, state, pid, port = rows[0].split()[:4]  # its state may have moved on since: rank 1 fails soon
    assert (rank, pid, port) == ("0", str(status["ranks"][0]["pid"]), str(status["ranks"][0]["port"]))
    assert state in ("ready", "stopping", "exited")
    wait_for(lambda: run.status()["stopping"], 10, "rank 1 to fail")
    public = supervisor("status", "--supervisor-port", str(run.supervisor_port), env=base_env, cwd=tmp_path)
    assert public.returncode == 1 and public.stdout.startswith("not ready: ")
    assert "(last errors hidden: set SUPERVISOR_ADMIN_TOKEN" in public.stdout
    admin = supervisor("status", "--json", env={**env, "SUPERVISOR_ADMIN_TOKEN": token}, cwd=tmp_path)
    assert json.loads(admin.stdout)["ranks"][1]["last_error"] == "standin: engine dead, answering 500"
    assert admin.returncode == 1
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 3, run.output()[-4000:]


def test_status_without_a_supervisor_says_so(base_env, tmp_path):
    port = free_ports(1)[0]
    result = supervisor("status", "--supervisor-port", str(port), env=base_env, cwd=tmp_path)
    assert result.returncode == 3
    assert f"no supervisor answered on 127.0.0.1:{port}" in result.stderr
    assert supervisor("status", "--bogus", env=base_env, cwd=tmp_path).returncode == 2
