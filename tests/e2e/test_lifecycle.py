"""The supervisor over stand-in ranks, driven as an operator or a kubelet would drive it."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import psutil
import pytest
from harness import NEVER, Http, tagged_processes, wait_for


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def test_two_ranks_ready_serve_and_stop_on_sigterm(start):
    run = start(2)
    status = run.wait_ready()
    assert status["ready"] is True and status["stopping"] is False
    ports = [r["port"] for r in status["ranks"]]
    assert ports[1] == ports[0] + 1
    for r in status["ranks"]:
        assert r["state"] == "ready"
        assert set(r) >= {"rank", "port", "pid", "state", "consecutive_failures", "last_probe_ms",
                          "exit_code", "started_at"}
        assert r["exit_code"] is None and r["consecutive_failures"] == 0
        assert psutil.Process(r["pid"]).ppid() == run.pid
        # like vLLM: an API server with an engine child, all in the rank's own process group
        engine = descendants(r["pid"])
        assert engine and os.getpgid(engine[0].pid) == r["pid"] != os.getpgid(run.pid)
        code, models = Http.get(r["port"], "/v1/models")
        assert code == 200 and models["data"][0]["id"] == "standin-model"
    for path in ("/ready", "/readyz", "/health", "/live"):
        assert run.get(path)[0] == 200, path

    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]
    out = run.output()
    for r in status["ranks"]:  # the exit summary: one line per rank with pid, port, exit, run time
        assert re.search(rf"\b{r['rank']}\s+{r['pid']}\s+{r['port']}\s+0\s+[\d.]+s\s+0\s+stopped", out), out
    assert "exiting with code 0: SIGTERM received" in out


def test_api_answers_503_while_ranks_load_and_names_them(start):
    run = start(2, "--standin-load-seconds", "30", "--standin-ranks", "1", options=["--min-ready-ranks", "2"])
    run.wait_api()
    code, body = run.get("/ready")
    assert code == 503 and body["stopping"] is False
    wait_for(lambda: run.get("/ready")[1]["not_ready"] == [{"rank": 1, "state": "starting"}], 10,
             "rank 0 ready while rank 1 still loads")
    assert run.get("/live")[0] == 200  # loading is alive: a liveness probe must not kill it
    # what a loading rank is doing, for a start that never comes: its CPU, its output, its kernel wait
    wait_for(lambda: run.status()["ranks"][1]["starting"] is not None, 10, "rank 1's start sampled")
    starting = run.status()["ranks"][1]["starting"]
    assert starting["state"] in ("S", "R") and starting["cpu_s"] >= 0 and starting["no_progress_for_s"] >= 0
    assert run.status()["ranks"][0]["starting"] is None  # ready: nothing to say
    run.send(signal.SIGTERM)  # a stop while a rank is still loading
    assert run.wait_exit() == 0, run.output()[-4000:]


def test_sigkill_of_a_rank_turns_unready_stops_the_rest_and_exits_137(start):
    run = start(2, options=[*NEVER])
    status = run.wait_ready()
    victim = status["ranks"][0]["pid"]
    engine = descendants(victim)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: run.get("/ready")[0] == 503, 2, "/ready to turn 503")
    assert run.wait_exit() == 137, run.output()[-4000:]
    assert not engine.is_running()  # the orphaned engine was stopped with its rank
    out = run.output()
    # nobody's OOM killer did it (the cgroup's count did not move) and it said nothing: no guess
    assert "exiting with code 137: rank 0 killed by SIGKILL (no error in its output)" in out
    assert "out of memory" not in out
    assert "exiting with code 137" in out


def test_rank_exit_code_becomes_the_supervisor_exit_code(start):
    run = start(2, "--standin-crash-after", "0.5", "--standin-crash-code", "9", "--standin-ranks", "1",
                options=[*NEVER])
    assert run.wait_exit() == 9, run.output()[-4000:]
    assert "rank 1 exited with code 9" in run.output()


def test_a_rank_code_that_reads_as_one_of_ours_becomes_6(start, tmp_path):
    """A rank's 3 is not the supervisor's "unhealthy": it becomes 6, and the rank's own code is in
    the exit line and the termination message."""
    message = tmp_path / "termination-log"
    run = start(2, "--standin-crash-after", "0.5", "--standin-crash-code", "3", "--standin-ranks", "1",
                options=[*NEVER, "--termination-log", str(message)])
    assert run.wait_exit() == 6, run.output()[-4000:]
    assert "exiting with code 6: rank 1 exited with code 3" in run.output()
    lines = message.read_text().splitlines()
    assert lines[0] == "exiting with code 6: rank 1 exited with code 3 (standin: crashing with code 3)"
    assert lines[1].startswith("rank 0: stopped") and lines[2].startswith("rank 1: exited with code 3")


def test_rank_exiting_zero_by_itself_is_a_failure(start):
    run = start(2, "--standin-crash-after", "0.5", "--standin-crash-code", "0", "--standin-ranks", "0",
                options=[*NEVER])
    assert run.wait_exit() == 5, run.output()[-4000:]
    assert "rank 0 exited with code 0 by itself" in run.output()


def test_rank_failing_at_start_stops_everything(start):
    """vLLM's argument parser exits 2: not the supervisor's 2, which means nothing started."""
    run = start(2, "--standin-exit-at-start", "2", "--standin-ranks", "1")  # 2: never retried
    assert run.wait_exit(60) == 6, run.output()[-4000:]
    assert "rank 1 exited with code 2" in run.output()
    assert "rank 0 exited: stopped" in run.output()


def test_unhealthy_rank_after_failure_threshold(start):
    run = start(2, "--standin-unhealthy-after", "1", "--standin-ranks", "0",
                options=[*NEVER, "--probe-interval", "0.2", "--failure-threshold", "3"])
    run.wait_ready()
    assert run.wait_exit() == 3, run.output()[-4000:]
    out = run.output()
    assert "rank 0 unhealthy: 3 probes failed in a row (last: HTTP 500)" in out
    assert "probe failed (1/3)" in out and "probe failed (2/3)" in out
    assert "rank 0 unhealthy: rank 0 unhealthy" not in out


def test_hung_health_endpoint_counts_as_failures(start):
    run = start(2, "--standin-hang-after", "1", "--standin-ranks", "1",
                options=[*NEVER, "--probe-interval", "0.2", "--probe-timeout", "0.3", "--failure-threshold", "2"])
    run.wait_ready()
    assert run.wait_exit() == 3, run.output()[-4000:]
    assert "rank 1 unhealthy: 2 probes failed in a row (last: no answer in 0.3 s)" in run.output()


def test_sigstopped_rank_is_detected_and_its_tree_killed(start):
    run = start(2, options=[*NEVER, "--probe-interval", "0.2", "--probe-timeout", "0.3",
                            "--failure-threshold", "2", "--stop-timeout", "2"])
    status = run.wait_ready()
    os.kill(status["ranks"][0]["pid"], signal.SIGSTOP)
    wait_for(lambda: run.status()["ranks"][0]["consecutive_failures"] >= 1, 5, "a failed probe")
    assert run.wait_exit() == 3, run.output()[-4000:]
    assert "rank 0 unhealthy" in run.output()


def test_startup_timeout_is_a_failure(start):
    run = start(1, "--standin-load-seconds", "60", options=[*NEVER, "--startup-timeout", "1"])
    assert run.wait_exit(10) == 4, run.output()[-4000:]
    assert "rank 0 not ready after --startup-timeout 1 s (last probe: connection refused)" in run.output()


def test_ranks_ignoring_sigterm_are_killed_after_stop_timeout(start):
    run = start(2, "--standin-ignore-sigterm", options=["--stop-timeout", "1.5"])
    run.wait_ready()
    t0 = time.monotonic()
    run.send(signal.SIGTERM)
    wait_for(lambda: run.get("/ready")[0] == 503, 1, "/ready 503 at once")
    assert run.get("/live")[0] == 503
    assert run.wait_exit() == 0  # a requested stop, even though ranks had to be killed
    took = time.monotonic() - t0
    assert took >= 1.5, took  # it did wait --stop-timeout before the SIGKILL
    out = run.output()
    assert "still running after --stop-timeout 1.5 s; SIGKILL" in out
    assert "killed by SIGKILL from the supervisor" in out


def test_second_signal_kills_at_once(start):
    run = start(2, "--standin-ignore-sigterm", options=["--stop-timeout", "600"])
    run.wait_ready()
    run.send(signal.SIGTERM)
    wait_for(lambda: run.get("/ready")[0] == 503, 10, "/ready 503")
    run.send(signal.SIGTERM)
    assert run.wait_exit(60) == 0  # not the 600 s of --stop-timeout
    assert "SIGTERM received while stopping: killing every rank now" in run.output()


def test_sigint_is_forwarded_and_exits_zero(start):
    run = start(2)
    run.wait_ready()
    run.send(signal.SIGINT)
    assert run.wait_exit() == 0, run.output()[-4000:]
    assert "sent SIGINT" in run.output()


def test_orphaned_engine_that_ignores_sigterm_is_killed_and_reaped(start):
    run = start(1, "--standin-engine-ignore-sigterm", options=[*NEVER, "--stop-timeout", "1"])
    status = run.wait_ready()
    server = status["ranks"][0]["pid"]
    engine = descendants(server)[0]
    os.kill(server, signal.SIGKILL)
    # the engine, orphaned, comes back to the supervisor (subreaper), not to init
    wait_for(lambda: engine.ppid() == run.pid or not engine.is_running(), 2, "engine re-parented")
    assert run.wait_exit() == 137, run.output()[-4000:]
    assert not engine.is_running()


def test_sigkill_of_the_supervisor_leaves_nothing(start, tag):
    run = start(3)
    run.wait_ready()
    assert len(tagged_processes(tag)) >= 7  # supervisor, guardian, 3 servers, 3 engines
    run.send(signal.SIGKILL)
    wait_for(lambda: not tagged_processes(tag), 15, "every rank process gone after supervisor SIGKILL")


def test_no_secret_in_status_or_logs(start):
    secret = "sk-very-secret-4242"
    run = start(1, "--api-key", secret, env={"HF_TOKEN": "hf_secret_token_4242"})
    run.wait_ready()
    text = str(run.status()) + str(run.get("/ready")) + str(run.get("/live"))
    run.send(signal.SIGTERM)
    run.wait_exit()
    text += run.output()
    assert "4242" not in text


def test_options_from_environment(start):
    run = start(1, "--standin-ignore-sigterm",
                env={"SUPERVISOR_STOP_TIMEOUT": "1", "SUPERVISOR_LOG_LEVEL": "debug"})
    run.wait_ready()
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]
    out = run.output()
    assert "still running after --stop-timeout 1 s" in out
    assert "[supervisor] DEBUG " in out


def test_dp_mode_runs_ranks_with_their_dp_rank(start):
    run = start(2, options=["--mode", "dp", "--data-parallel-size", "4", "--data-parallel-start-rank", "2"])
    status = run.wait_ready()
    argv = psutil.Process(status["ranks"][1]["pid"]).cmdline()
    joined = " ".join(argv)
    assert "--data-parallel-rank 3" in joined and "--data-parallel-size 4" in joined
    assert "--data-parallel-size-local 1" in joined
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


def test_each_rank_gets_its_own_devices(start):
    run = start(2, "-tp", "2")
    status = run.wait_ready()
    envs = [psutil.Process(r["pid"]).environ() for r in status["ranks"]]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1", "2,3"]
    assert [e["SUPERVISOR_LOCAL_RANK"] for e in envs] == ["0", "1"]
    assert [r["devices"] for r in status["ranks"]] == ["0,1", "2,3"]
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


def test_rank_output_is_teed_with_a_prefix_and_its_error_named(start):
    run = start(2, "--standin-traceback-at-start", "--standin-ranks", "1", options=[*NEVER])
    assert run.wait_exit() == 1, run.output()[-4000:]
    out = run.output()
    assert "[rank1] Traceback (most recent call last):" in out
    assert "[rank1] ValueError: bad model config" in out
    assert "last error: ValueError: bad model config: hidden_size must be divisible by heads" in out
    assert "exiting with code 1: rank 1 exited with code 1 (ValueError: bad model config" in out


def test_failed_rank_shows_last_error_in_status_to_the_admin_only(start):
    token = "adm1n-t0ken-for-logs"
    run = start(2, "--standin-unhealthy-after", "0.5", "--standin-ignore-sigterm", "--standin-ranks", "1",
                "--standin-chatty", "1",
                options=[*NEVER, "--probe-interval", "0.2", "--stop-timeout", "3"],
                env={"SUPERVISOR_ADMIN_TOKEN": token})
    run.wait_ready()
    assert run.status(token)["ranks"][1]["last_line"] == "standin line 0"
    assert run.status()["ranks"][1]["last_line"] is None  # without the token: no log text at all
    wait_for(lambda: run.status()["stopping"], 10, "rank 1 to fail")
    # the failing rank ignores SIGTERM, so the stop takes --stop-timeout: time to read /status
    public, admin = run.status(), run.status(token)
    assert admin["ranks"][1]["last_error"] == "standin: engine dead, answering 500"
    assert admin["ranks"][0]["last_error"] is None and admin["rank_logs"] == "shown"
    assert public["rank_logs"].startswith("hidden: send 'Authorization: Bearer <admin token>'")
    assert run.status("wrong-token")["rank_logs"] == public["rank_logs"]
    for field in ("last_error", "log_tail", "last_line"):
        assert all(r[field] is None for r in public["ranks"]), field
    # everything else a probe, a balancer or a dashboard reads is the same for both
    assert public["ranks"][1]["consecutive_failures"] == admin["ranks"][1]["consecutive_failures"] == 3
    stable = ("rank", "port", "pid", "devices", "attempt")  # read a moment apart: states may move on
    assert [[r[k] for k in stable] for r in public["ranks"]] == [[r[k] for k in stable] for r in admin["ranks"]]
    assert run.wait_exit() == 3, run.output()[-4000:]


def test_many_lines_reach_the_console_whole(start):
    run = start(2, "--standin-chatty", "5000")
    run.wait_ready()
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]
    lines = run.output().splitlines()
    for rank in (0, 1):
        mine = [l for l in lines if l.startswith(f"[rank{rank}] standin line ")]
        assert mine == [f"[rank{rank}] standin line {i}" for i in range(5000)]


def test_shared_memory_of_a_killed_rank_is_removed(start, tag):
    name = f"psm_test_{tag[:8]}"
    run = start(1, "--standin-shm", name, options=[*NEVER])
    status = run.wait_ready()
    assert os.path.exists(f"/dev/shm/{name}")
    os.kill(status["ranks"][0]["pid"], signal.SIGKILL)  # the engine, holding the segment, lives on
    assert run.wait_exit() == 137, run.output()[-4000:]
    assert not os.path.exists(f"/dev/shm/{name}")
    assert f"removed shared memory /dev/shm/{name}" in run.output()


def test_guardian_removes_shared_memory_and_run_dir_when_the_supervisor_is_killed(start, tag):
    name = f"psm_test_{tag[:8]}"
    run = start(1, "--standin-shm", name)
    status = run.wait_ready()
    tmpdir = psutil.Process(status["ranks"][0]["pid"]).environ()["TMPDIR"]
    assert os.path.isdir(tmpdir)
    run.send(signal.SIGKILL)
    wait_for(lambda: not tagged_processes(tag), 3, "every process gone")
    wait_for(lambda: not os.path.exists(f"/dev/shm/{name}"), 3, "the segment removed")
    wait_for(lambda: not os.path.exists(os.path.dirname(tmpdir)), 3, "the run directory removed")


def test_each_rank_has_its_own_temp_dir_removed_at_exit(start):
    run = start(2)
    status = run.wait_ready()
    envs = [psutil.Process(r["pid"]).environ() for r in status["ranks"]]
    dirs = [e["TMPDIR"] for e in envs]
    assert dirs[0] != dirs[1] and all(os.path.isdir(d) for d in dirs)
    assert [e["VLLM_RPC_BASE_PATH"] for e in envs] == dirs
    assert all("TORCHINDUCTOR_CACHE_DIR" in e for e in envs)
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]
    assert not any(os.path.exists(d) for d in dirs)
    assert not os.path.exists(os.path.dirname(dirs[0]))


def test_another_program_answering_on_a_rank_port_fails_startup(start):
    import http.server
    import threading
    run = start(1, "--standin-load-seconds", "5")
    run.wait_api()
    port = run.status()["ranks"][0]["port"]

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    squatter = http.server.HTTPServer(("127.0.0.1", port), Ok)
    threading.Thread(target=squatter.serve_forever, daemon=True).start()
    try:
        assert run.wait_exit() == 3, run.output()[-4000:]
    finally:
        squatter.shutdown()
        squatter.server_close()
    assert f"port {port} is answered by pid {os.getpid()}" in run.output()
    assert "not by the rank's server" in run.output()


def test_orphans_that_left_the_group_are_reaped_by_pid(start):
    run = start(1, "--standin-daemon-seconds", "1.5")
    server = run.wait_ready()["ranks"][0]["pid"]

    def adopted() -> list[psutil.Process]:
        return [c for c in psutil.Process(run.pid).children()
                if c.pid != server and "standin" in " ".join(c.cmdline())]
    # its parent exits at once, so the kernel hands it to the supervisor (child subreaper)
    daemon = wait_for(adopted, 5, "the daemon to be re-parented to the supervisor")[0]
    assert os.getpgid(daemon.pid) != server  # outside the rank's process group
    # when it exits, the supervisor must reap it by pid: no zombie child remains
    wait_for(lambda: not psutil.pid_exists(daemon.pid), 5, "the daemon to exit and be reaped")
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


def test_api_socket_is_tcp_so_responses_are_not_held_by_nagle():
    """asyncio sets TCP_NODELAY only on sockets that say IPPROTO_TCP; accepted connections inherit
    it from the listening socket. With proto 0 each response waited ~40 ms for a delayed ACK."""
    import socket

    from vllm_dp_supervisor.preflight import bind_socket
    with bind_socket("127.0.0.1", 0) as sock:
        assert sock.proto == socket.IPPROTO_TCP


def test_a_long_tmpdir_still_gives_vllm_short_enough_ipc_paths(tmp_path):
    """vLLM's IPC sockets live at <rank dir>/<uuid4>: at most 107 bytes in all."""
    from vllm_dp_supervisor.preflight import MAX_RANK_DIR, choose_run_dir
    long_dir = tmp_path / ("x" * 80)
    long_dir.mkdir()
    chosen = choose_run_dir(256, {"TMPDIR": str(long_dir)})
    assert str(chosen).startswith("/tmp/vdps-") and len(str(chosen / "rank255")) <= MAX_RANK_DIR
    short = choose_run_dir(2, {"TMPDIR": "/tmp"})
    assert short.parent == Path("/tmp")



def test_a_long_tmpdir_without_a_writable_tmp_is_refused_with_what_to_do(tmp_path, monkeypatch):
    from vllm_dp_supervisor import preflight
    long_dir = tmp_path / ("x" * 80)
    long_dir.mkdir()
    monkeypatch.setattr(preflight.os, "access", lambda path, mode: False)  # /tmp read-only
    with pytest.raises(preflight.ConfigError, match=r"is too long for vLLM's IPC socket paths .* set TMPDIR"):
        preflight.choose_run_dir(2, {"TMPDIR": str(long_dir)})


def test_ranks_get_short_rank_dirs_under_a_long_tmpdir(start, tmp_path):
    long_dir = tmp_path / ("y" * 80)
    long_dir.mkdir()
    run = start(1, env={"TMPDIR": str(long_dir)})
    status = run.wait_ready()
    rpc = psutil.Process(status["ranks"][0]["pid"]).environ()["VLLM_RPC_BASE_PATH"]
    assert len(rpc) + 1 + 36 <= 107 and os.path.isdir(rpc)
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]
    assert not os.path.exists(rpc)


def test_more_cpu_ranks_than_cores_share_them_with_a_warning(start):
    cores = sorted(os.sched_getaffinity(0))
    n = len(cores) + 2
    run = start(n, options=["--device", "cpu"])
    status = run.wait_ready()
    binds = [psutil.Process(r["pid"]).environ()["VLLM_CPU_OMP_THREADS_BIND"] for r in status["ranks"]]
    assert binds == [str(cores[i % len(cores)]) for i in range(n)]
    # and each runs there from its start, its engine child too (vLLM's bind has nothing to move)
    for i, r in enumerate(status["ranks"]):
        tree = [psutil.Process(r["pid"]), *psutil.Process(r["pid"]).children(recursive=True)]
        assert {p.pid: set(os.sched_getaffinity(p.pid)) for p in tree} == {p.pid: {cores[i % len(cores)]} for p in tree}
    assert f"{n} CPU ranks share {len(cores)} core(s) round robin" in run.output()
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


def test_device_none_leaves_the_environment_alone(start):
    run = start(2, options=["--device", "none"], env={"CUDA_VISIBLE_DEVICES": "7"})
    status = run.wait_ready()
    for r in status["ranks"]:
        env = psutil.Process(r["pid"]).environ()
        assert env["CUDA_VISIBLE_DEVICES"] == "7" and "VLLM_CPU_OMP_THREADS_BIND" not in env
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


def test_a_server_that_cannot_be_executed_exits_127_through_the_state_machine(start, tmp_path):
    """Once the one state write that bypassed change_state: no event, no published view."""
    bad = tmp_path / "not-a-program"
    bad.write_bytes(b"\x00\x01 not an executable format")
    bad.chmod(0o755)
    run = start(1, server_cmd=str(bad))
    assert run.wait_exit(60) == 127, run.output()[-4000:]
    out = run.output()
    assert "rank 0 exited: could not start: Exec format error" in out
    assert "exiting with code 127" in out
