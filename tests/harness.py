"""The test harness: runs the supervisor as a user does (`python -m vllm_dp_supervisor ...`) over
the stand-in, reads its HTTP API, and proves nothing survives. Imported by the tests and by
conftest.py (which holds only the fixtures).

Every process a test starts carries STANDIN_TEST_TAG=<uuid> in its environment (children inherit
it), so the leak check finds descendants even after they were re-parented. At the end of each
test, any tagged process still alive fails the test (after being killed, so the next test starts
clean).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
STANDIN = [sys.executable, str(ROOT / "tests" / "standin.py")]
STANDIN_CMD = f"{sys.executable} {ROOT / 'tests' / 'standin.py'}"
# How a user runs it: the installed package, from a directory that is not the checkout (where a
# directory of the same name would shadow what is installed).
SUPERVISOR = [sys.executable, "-m", "vllm_dp_supervisor"]
TAG_ENV = "STANDIN_TEST_TAG"
# For the tests of what a failure does when nothing restarts (the default restarts a failed rank).
NEVER = ("--restart-policy", "never")


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll `condition` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


_next_base = [20000 + (os.getpid() % 200) * 50]


def free_ports(n: int) -> list[int]:
    """n consecutive free ports."""
    while True:
        base = _next_base[0]
        _next_base[0] += n + 3
        if _next_base[0] > 60000:
            _next_base[0] = 20000
        ports = list(range(base, base + n))
        if all(_port_free(p) for p in ports):
            return ports


def tagged_processes(tag: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(TAG_ENV) == tag:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


class Http:
    @staticmethod
    def get(port: int, path: str, timeout: float = 5.0, token: str | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                body = r.read()
                return r.status, json.loads(body) if body else None
        except urllib.error.HTTPError as e:
            body = e.read()
            return e.code, json.loads(body) if body else None


def event_history(port: int, quiet: float = 0.5) -> list[dict]:
    """Every event a supervisor kept: /events from the start, read until it goes quiet."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=quiet)
    sock.sendall(b"GET /events?last_event_id=0 HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    try:
        while chunk := sock.recv(1 << 20):
            data += chunk
    except TimeoutError:
        pass
    finally:
        sock.close()
    return [json.loads(line[6:]) for line in data.decode(errors="replace").splitlines() if line.startswith("data: ")]


class SupervisorRun:
    """One supervisor process started by a test (`python -m vllm_dp_supervisor` unless told)."""

    def __init__(self, args: list[str], env: dict[str, str], tag: str, tmp: Path,
                 command: list[str] = SUPERVISOR) -> None:
        self.args = args
        self.tag = tag
        self.log_path = tmp / f"supervisor-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (open for the run's life; close() closes it)
        self.proc = subprocess.Popen([*command, *args], env=env, cwd=tmp,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.supervisor_port = int(args[args.index("--supervisor-port") + 1]) \
            if "--supervisor-port" in args else int(env.get("SUPERVISOR_SUPERVISOR_PORT", 9256))
        router = args[args.index("--router-port") + 1] if "--router-port" in args else \
            env.get("SUPERVISOR_ROUTER_PORT")
        self.router_port = int(router) if router is not None and router.isdigit() else None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def get(self, path: str, timeout: float = 5.0, token: str | None = None) -> tuple[int, Any]:
        return Http.get(self.supervisor_port, path, timeout, token)

    def status(self, token: str | None = None) -> dict:
        """`token`: the admin token, which shows the ranks' log lines."""
        code, body = self.get("/status", token=token)
        assert code == 200
        return body

    def events(self, quiet: float = 0.5) -> list[dict]:
        """Every event the supervisor kept (/events from the start), read until it goes quiet."""
        return event_history(self.supervisor_port, quiet)

    def rank_pid(self, rank: int) -> int:
        return self.status()["ranks"][rank]["pid"]

    def wait_api(self, timeout: float = 10) -> None:
        def up() -> bool:
            self.assert_running()
            try:
                self.get("/live", timeout=1)
                return True
            except (TimeoutError, urllib.error.URLError, ConnectionError):
                return False
        wait_for(up, timeout, "the supervisor API to answer")

    def wait_ready(self, timeout: float = 20, every_rank: bool = True) -> dict:
        """/ready answers 200 and, unless told otherwise, every rank is ready (the default
        --min-ready-ranks is half of them)."""
        self.wait_api()

        def ready() -> bool:
            self.assert_running()
            try:
                return self.all_ready() if every_rank else self.get("/ready")[0] == 200
            except (TimeoutError, urllib.error.URLError, ConnectionError):
                try:  # its API closes just before it exits: give it a moment, then show why
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
                self.assert_running()
                raise
        wait_for(ready, timeout, "/ready to answer 200")
        return self.status()

    def all_ready(self) -> bool:
        """/ready is 200 and names no rank that is not (it may be 200 on half of them)."""
        return self.get("/ready") == (200, {"ready": True})

    def assert_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"supervisor exited with {self.proc.returncode}:\n{self.output()}")

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 20) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"supervisor still running after {timeout} s:\n{self.output()}") from None

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def assert_no_survivors(tag: str, timeout: float = 5.0) -> None:
    """Every process the test started is gone; kill and fail otherwise."""
    try:
        wait_for(lambda: not tagged_processes(tag), timeout, "every test process to be gone", 0.05)
    except AssertionError:
        left = tagged_processes(tag)
        desc = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in left]
        for p in left:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        raise AssertionError("processes survived the test:\n" + "\n".join(desc)) from None


# ---- helpers shared by the test modules ----

FAST = ["--restart-policy", "on-failure", "--restart-backoff", "0.1"]  # restarts without waiting
DEEP = ["--deep-probe-interval", "0.2", "--deep-probe-timeout", "0.3", "--failure-threshold", "2",
        "--probe-interval", "0.2"]  # a deep probe every 0.2 s, two failures make a rank hung


def post(run, path: str, token: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{run.supervisor_port}{path}", method="POST", data=b"")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def standin_metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    return float(next(l for l in text.splitlines() if l.startswith(name)).rsplit(" ", 1)[1])


def get_raw(port: int, path: str) -> tuple[int, bytes]:
    """No redirect following: /metrics must answer 200 itself."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read()


def samples_of(exposition: str) -> dict[tuple[str, tuple], float]:
    """(name, sorted labels) → value, for every sample of a Prometheus text exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(exposition) for s in family.samples}


def metrics(run: SupervisorRun) -> dict[tuple[str, tuple], float]:
    code, body = get_raw(run.supervisor_port, "/metrics")
    assert code == 200
    return samples_of(body.decode())


# ---- through the router ----

def request(run, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 30) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", run.router_port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def complete(run, **extra) -> tuple[int, dict, bytes]:
    body = json.dumps({"model": "standin-model", "prompt": "hi", **extra}).encode()
    return request(run, "POST", "/v1/completions", body, {"Content-Type": "application/json"})
