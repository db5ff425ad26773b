"""Rank log files, console tee, failure reasons, /metrics and /events, driven as a user would."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from harness import NEVER, STANDIN_CMD, SUPERVISOR, free_ports, get_raw, metrics, wait_for


def rank_logs(log_dir: Path, run_id: str, rank: int) -> Path:
    return log_dir / run_id / "attempt_0" / f"rank_{rank}"


def test_every_line_of_a_fast_dying_rank_reaches_its_file(start, tmp_path):
    run = start(1, "--standin-chatty", "100000", "--standin-exit-at-start", "9",
                options=["--log-dir", str(tmp_path), "--run-id", "r1"])
    assert run.wait_exit(60) == 9, run.output()[-4000:]
    lines = (rank_logs(tmp_path, "r1", 0) / "stdout.log").read_text().splitlines()
    assert lines == [f"standin line {i}" for i in range(100000)]
    stderr = (rank_logs(tmp_path, "r1", 0) / "stderr.log").read_text()
    assert "invalid int value" in stderr
    assert f"rank logs: {tmp_path / 'r1'}" in run.output()


def test_chatty_ranks_files_and_console_keep_whole_lines(start, tmp_path):
    run = start(3, "--standin-chatty", "3000", options=["--log-dir", str(tmp_path), "--run-id", "r"])
    run.wait_ready()
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]
    console = run.output().splitlines()
    for rank in range(3):
        expected = [f"standin line {i}" for i in range(3000)]
        assert (rank_logs(tmp_path, "r", rank) / "stdout.log").read_text().splitlines() == expected
        assert [l[len(f"[rank{rank}] "):] for l in console if l.startswith(f"[rank{rank}] standin")] == expected
    assert all(l.startswith(("[rank", "20")) for l in console if l), "a console line was interleaved"


def test_a_line_cut_off_by_death_is_still_written_whole(start, tmp_path):
    run = start(1, "--standin-partial-line", "half a line, no newline",
                options=[*NEVER, "--log-dir", str(tmp_path), "--run-id", "r"])
    status = run.wait_ready()
    wait_for(lambda: (rank_logs(tmp_path, "r", 0) / "stderr.log").exists(), 5, "the log file")
    os.kill(status["ranks"][0]["pid"], signal.SIGKILL)
    assert run.wait_exit() == 137, run.output()[-4000:]
    assert (rank_logs(tmp_path, "r", 0) / "stderr.log").read_text().endswith("half a line, no newline\n")
    assert "[rank0] half a line, no newline\n" in run.output()


def test_rotation_keeps_one_previous_file(start, tmp_path):
    run = start(1, "--standin-chatty", "3000", options=["--log-dir", str(tmp_path), "--run-id", "r",
                                                          "--log-max-bytes", "8K"])
    run.wait_ready()
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]
    current = rank_logs(tmp_path, "r", 0) / "stdout.log"
    previous = current.with_name("stdout.log.1")
    assert current.stat().st_size <= 8192 and previous.stat().st_size <= 8192
    tail = previous.read_text().splitlines() + current.read_text().splitlines()
    assert tail == [f"standin line {i}" for i in range(3000 - len(tail), 3000)]


def test_log_dir_none_keeps_nothing_and_tee_selects_ranks(start, tmp_path):
    run = start(2, "--standin-chatty", "5", options=["--log-dir", "none", "--tee", "1"],
                env={"TMPDIR": str(tmp_path)})
    status = run.wait_ready()
    assert all(r["log_dir"] is None for r in status["ranks"])
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]
    out = run.output()
    assert "[rank1] standin line 4" in out and "[rank0]" not in out
    assert not (tmp_path / "vllm-dp-supervisor").exists()


def test_default_log_dir_is_under_the_temp_dir_and_named(start, tmp_path):
    run = start(1, "--standin-chatty", "2", env={"TMPDIR": str(tmp_path)})
    status = run.wait_ready()
    log_dir = Path(status["ranks"][0]["log_dir"])
    assert log_dir.is_relative_to(tmp_path / "vllm-dp-supervisor") and log_dir.name == "rank_0"
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]
    assert f"rank logs: {log_dir.parent.parent}" in run.output()
    assert (log_dir / "stdout.log").read_text() == "standin line 0\nstandin line 1\n"


def test_binary_garbage_breaks_nothing(start, tmp_path):
    run = start(1, "--standin-garbage", "5000", options=["--log-dir", str(tmp_path), "--run-id", "r"])
    run.wait_ready()
    assert run.get("/status")[0] == 200
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]
    garbage = bytes((i * 7 + 0xF5) % 256 for i in range(5000))
    written = (rank_logs(tmp_path, "r", 0) / "stdout.log").read_bytes()
    assert written.replace(b"\n", b"") == garbage.replace(b"\n", b"")


def test_a_console_nobody_reads_stalls_neither_ranks_nor_probes(tag, base_env, tmp_path):
    ports = free_ports(3)
    args = ["--dp-size-local", "2", "--port", str(ports[1]), "--supervisor-port", str(ports[0]),
            "--host", "127.0.0.1", "--server-cmd", STANDIN_CMD, "--log-dir", str(tmp_path), "--run-id", "r",
            "--probe-interval", "0.2", "--", "m", "--standin-chatty", "200000"]
    stderr = open(tmp_path / "stderr.txt", "wb")  # noqa: SIM115 (the child's, for its whole run)
    # stdout is a pipe that is never read: it fills after 64 KiB
    proc = subprocess.Popen([*SUPERVISOR, *args], cwd=tmp_path, env=base_env,
                            stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
    try:
        def ready() -> bool:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", ports[0], timeout=2)
                conn.request("GET", "/ready")
                return conn.getresponse().status == 200
            except OSError:
                return False
        wait_for(ready, 30, "ranks ready and probed although the console is blocked")
        for rank in range(2):
            path = rank_logs(tmp_path, "r", rank) / "stdout.log"
            wait_for(lambda path=path: path.exists() and path.read_text().count("\n") == 200000, 30,
                     f"rank {rank}'s file to get all 200000 lines")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()


def test_status_of_a_rank_that_raised(start):
    run = start(2, "--standin-traceback-at-start", "--standin-ranks", "1",
                options=["--stop-timeout", "3", "--show-rank-logs", "all"])
    run.wait_api()
    # rank 0 takes the SIGTERM: ignore it, so the stop lasts --stop-timeout and /status can be read
    wait_for(lambda: run.status()["ranks"][1]["state"] == "exited", 10, "rank 1 to exit")
    rank = run.status()["ranks"][1]
    assert rank["last_error"] == "ValueError: bad model config: hidden_size must be divisible by heads"
    assert "Traceback (most recent call last):" in rank["log_tail"]
    assert rank["exit_code"] == 1
    assert run.wait_exit() == 1, run.output()[-4000:]


def test_a_loading_rank_shows_its_progress(start):
    run = start(1, "--standin-load-seconds", "30", "--standin-partial-line", "x",
                "--standin-chatty", "1", options=["--progress-interval", "0.5", "--show-rank-logs", "all"])
    run.wait_api()
    wait_for(lambda: run.status()["ranks"][0]["last_line"] == "standin line 0", 5, "its last line")
    assert run.status()["ranks"][0]["starting_for_s"] > 0
    wait_for(lambda: "rank 0 not ready after 1 s: standin line 0" in run.output(), 5, "a progress line")
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


def test_metrics_follow_a_scripted_crash(start):
    run = start(2, "--standin-ignore-sigterm", "--standin-ranks", "1", options=[*NEVER, "--stop-timeout", "3"])
    status = run.wait_ready()
    m = metrics(run)
    assert m[("supervisor_ready", ())] == 1 and m[("supervisor_stopping", ())] == 0
    assert m[("supervisor_rank_state", (("rank", "0"), ("state", "ready")))] == 1
    assert m[("supervisor_rank_state", (("rank", "0"), ("state", "starting")))] == 0
    assert m[("supervisor_rank_restarts_total", (("rank", "1"),))] == 0
    assert m[("supervisor_probe_duration_seconds_count", (("rank", "0"),))] >= 1
    for rank in (0, 1):  # the same figure /status shows, from the same published view
        assert m[("supervisor_rank_start_to_ready_seconds", (("rank", str(rank)),))] == \
            status["ranks"][rank]["ready_after_s"] > 0
    assert not any(name.endswith("_created") for name, _ in m)

    os.kill(run.status()["ranks"][0]["pid"], signal.SIGKILL)
    # The router drains first (in flight: nothing here), then rank 1 gets its SIGTERM and ignores it.
    wait_for(lambda: run.status()["ranks"][1]["state"] == "stopping", 5, "rank 1 to be signalled")
    m = metrics(run)  # rank 1 ignores SIGTERM: the supervisor is still up for --stop-timeout
    assert m[("supervisor_ready", ())] == 0 and m[("supervisor_stopping", ())] == 1
    assert m[("supervisor_rank_state", (("rank", "0"), ("state", "exited")))] == 1
    assert m[("supervisor_rank_state", (("rank", "1"), ("state", "stopping")))] == 1
    assert m[("supervisor_rank_exits_total", (("rank", "0"), ("reason", "signal")))] == 1
    assert run.wait_exit() == 137, run.output()[-4000:]


def test_metrics_count_probe_failures_by_reason(start):
    run = start(1, "--standin-unhealthy-after", "0.5", options=["--probe-interval", "0.1",
                                                                 "--failure-threshold", "50"])
    run.wait_ready()
    wait_for(lambda: metrics(run)[("supervisor_probe_failures_total", (("rank", "0"), ("reason", "status")))] >= 3,
             10, "status failures counted")
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


def test_refused_probes_while_loading_are_counted_apart(start):
    """~9,000 refused probes over a 30-minute load once went to supervisor_probe_failures_total."""
    run = start(1, "--standin-load-seconds", "1", options=["--startup-probe-interval", "0.05"])
    run.wait_ready()
    m = metrics(run)
    assert m[("supervisor_startup_probe_failures_total", (("rank", "0"), ("reason", "refused")))] >= 3
    assert m[("supervisor_probe_failures_total", (("rank", "0"), ("reason", "refused")))] == 0
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


class Sse:
    """A raw SSE client: reads events as they come."""

    def __init__(self, port: int, last_id: int | None = None, token: str | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        extra = f"Last-Event-ID: {last_id}\r\n" if last_id is not None else ""
        extra += f"Authorization: Bearer {token}\r\n" if token is not None else ""
        self.sock.sendall(f"GET /events HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        self.buf = b""

    def events(self, count: int, timeout: float = 10) -> list[dict]:
        found: list[dict] = []
        deadline = time.monotonic() + timeout
        while len(found) < count:
            while b"\n\n" not in self.buf:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = self.sock.recv(65536)
                assert chunk, f"stream closed after {found}"
                self.buf += chunk
            block, self.buf = self.buf.split(b"\n\n", 1)
            data = [l[6:] for l in block.decode().splitlines() if l.startswith("data: ")]
            if data:
                found.append(json.loads(data[0]))
        return found

    def until_closed(self, timeout: float = 20) -> list[dict]:
        """Every event until the server ends the stream."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buf += chunk
        data = [l[6:] for l in self.buf.decode().splitlines() if l.startswith("data: ")]
        return [json.loads(d) for d in data]

    def close(self) -> None:
        self.sock.close()


def test_events_stream_and_replay_after_reconnect(start):
    run = start(2, "--standin-ignore-sigterm", "--standin-ranks", "1", options=[*NEVER, "--stop-timeout", "2"],
                env={"SUPERVISOR_ADMIN_TOKEN": "events-t0ken"})
    run.wait_ready()
    first = Sse(run.supervisor_port, last_id=0)  # everything kept so far: both ranks became ready
    seen = first.events(2)
    assert sorted((e["kind"], e["rank"], e["new"]) for e in seen) == [("state", 0, "ready"), ("state", 1, "ready")]
    first.close()
    os.kill(run.status()["ranks"][0]["pid"], signal.SIGKILL)  # events happen while nobody listens
    wait_for(lambda: run.status()["stopping"], 5, "the stop")
    admin = Sse(run.supervisor_port, last_id=seen[-1]["id"], token="events-t0ken")
    again = Sse(run.supervisor_port, last_id=seen[-1]["id"])
    missed = again.until_closed()  # the replay, then live events until the supervisor stops
    again.close()
    # the rank's own last words only with the admin token; the rest is the same event
    admin_exit = next(e for e in admin.until_closed() if e["kind"] == "exit")
    admin.close()
    public_exit = next(e for e in missed if e["kind"] == "exit")
    assert "last_error" in admin_exit and "last_error" not in public_exit
    assert {k: v for k, v in admin_exit.items() if k != "last_error"} == public_exit
    assert [e["id"] for e in missed] == list(range(seen[-1]["id"] + 1, missed[-1]["id"] + 1))
    by_kind = {(e["kind"], e["rank"]): e for e in missed}
    assert by_kind[("state", 0)]["new"] == "exited"
    assert by_kind[("stop", None)]["by"] == "failure"
    assert by_kind[("exit", 0)]["exit_code"] == 137
    assert by_kind[("exit", 0)]["outcome"] == "killed by SIGKILL"
    assert missed[-1]["kind"] == "supervisor" and missed[-1]["new"] == "stopped"
    assert all({"id", "time", "rank", "kind"} <= e.keys() for e in missed)
    assert run.wait_exit() == 137, run.output()[-4000:]


def test_events_reject_a_bad_last_event_id(start):
    run = start(1)
    run.wait_ready()
    code, body = get_raw(run.supervisor_port, "/events?last_event_id=abc")
    assert code == 400 and b"Last-Event-ID" in body
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


def test_json_log_format(start):
    run = start(2, "--standin-chatty", "2", "--standin-json-line", options=["--log-format", "json"])
    run.wait_ready()
    run.send(signal.SIGUSR1)
    wait_for(lambda: "status (SIGUSR1)" in run.output(), 10, "the status logged")
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]
    records = [json.loads(l) for l in run.output().splitlines() if l.strip()]  # every line is JSON
    status = next(r for r in records if r["message"] == "status (SIGUSR1)")
    assert status["status"]["ready"] is True and len(status["status"]["ranks"]) == 2  # data, not a string
    rows = [r for r in records if "outcome" in r]  # the exit summary, a row per rank, as fields
    assert [(r["rank"], r["exit_code"], r["restarts"]) for r in rows] == [(0, 0, 0), (1, 0, 0)]
    merged = [r for r in records if r.get("name") == "standin"]  # a rank's own JSON line, merged
    assert len(merged) == 2 and all(r["severity"] == "WARNING" and r["message"] == "standin json line" for r in merged)
    own = [r for r in records if "stream" not in r]
    assert own and all({"time", "severity", "message"} <= r.keys() for r in own)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["time"]) for r in records)
    assert any(r.get("rank") == 0 and "ready" in r["message"] and r["severity"] == "INFO" for r in own)
    ranks = [{k: r[k] for k in ("rank", "stream", "message", "severity")} for r in records if "stream" in r]
    assert {"rank": 1, "stream": "stdout", "message": "standin line 1", "severity": "INFO"} in ranks


def test_json_log_keeps_a_ranks_traceback_in_one_record(start):
    run = start(2, "--standin-traceback-at-start", "--standin-ranks", "1", options=[*NEVER, "--log-format", "json"])
    assert run.wait_exit() == 1, run.output()[-4000:]
    records = [json.loads(l) for l in run.output().splitlines() if l.strip()]
    tracebacks = [r for r in records if r.get("stream") and "Traceback" in r["message"]]
    assert len(tracebacks) == 1, tracebacks
    lines = tracebacks[0]["message"].splitlines()
    assert lines[0] == "Traceback (most recent call last):" and lines[-1].startswith("ValueError: bad model config")
    assert tracebacks[0]["severity"] == "ERROR" and tracebacks[0]["rank"] == 1
    # none of its lines became a record of its own
    assert not [r for r in records if r.get("stream") and r["message"].startswith(("  File", "ValueError"))]
    final = next(r for r in records if r["message"].startswith("exiting with code 1"))
    assert final["severity"] == "ERROR"
