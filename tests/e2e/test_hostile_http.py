"""Hostile and broken clients on the supervisor's port (which listens on the pod IP).

Each case once hurt: endless headers grew the supervisor by 600 MB in a second; "²" in a rank
number gave a 500 with a traceback; 1,100 idle connections under a 1,024-descriptor limit made
/ready unanswerable and flooded stderr with accept() tracebacks. Whatever is sent, the answer is a
4xx (or a closed connection), /ready keeps answering, and nothing is logged per request.
"""

from __future__ import annotations

import signal
import socket
import time

import pytest
from harness import STANDIN_CMD, SUPERVISOR, SupervisorRun, free_ports, wait_for

TOKEN = "hostile-test-token"


def raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send `data` on a fresh connection; everything the server answers until it closes or pauses."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and b"connection: close" not in b"".join(chunks).lower():
                    break
        except (TimeoutError, ConnectionResetError):
            pass
        return b"".join(chunks)


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer.split(b" ", 2)[1])


def get(path: str, *headers: str) -> bytes:
    return ("GET " + path + " HTTP/1.1\r\nHost: x\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode()


@pytest.fixture
def run(start):
    run = start(2, options=["--admin-token", TOKEN])
    run.wait_ready()
    yield run
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]
    out = run.output()
    assert "Traceback" not in out and "Exception in ASGI application" not in out, out[-3000:]


@pytest.mark.parametrize("request_bytes,expected", [
    (get("/ready/%C2%B2"), 400),                     # "²".isdigit() is true; int("²") raises
    (get("/ready/%D9%A1"), 400),                     # an Arabic-Indic one once answered for rank 1
    (get("/ready/" + "9" * 5000), 400),
    (get("/ready/-1"), 400),
    (get("/ready/2"), 404),
    (get("/ready/1"), 200),
    (get("/events", "Last-Event-ID: \u00b2".encode("utf-8").decode("latin-1")), 400),
    (get("/events", "Last-Event-ID: " + "9" * 5000), 400),
    (get("/events?last_event_id=%C2%B2"), 400),
    (get("/events?last_event_id=" + "9" * 5000), 400),
    (b"POST /ranks/%C2%B2/restart HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
     + b"\r\nContent-Length: 0\r\n\r\n", 400),
    (b"POST /ranks/" + b"7" * 5000 + b"/restart HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
     + TOKEN.encode() + b"\r\nContent-Length: 0\r\n\r\n", 400),
    (b"POST /drain HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n", 413),
    (b"POST /drain HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     + (b"10000\r\n" + b"x" * 0x10000 + b"\r\n") * 2, 413),
    (get("/ready", *[f"X-H{i}: v" for i in range(150)]), 431),
    (get("/" + "a" * 100_000), 431),
    (get("/ready", "Upgrade: websocket", "Connection: Upgrade"), 400),
    (b"GET /re\x00ady HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, 400),  # a TLS hello
    (b"FOO /ready HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # not a method httptools knows
    (b"DELETE /ready HTTP/1.1\r\nHost: x\r\n\r\n", 405),
])
def test_bad_requests_get_a_4xx_never_a_500(run, request_bytes, expected):
    assert status_of(raw(run.supervisor_port, request_bytes)) == expected
    assert run.get("/ready")[0] == 200


def test_endless_headers_are_cut_off(run):
    """One connection that sends header lines and never the blank line."""
    line = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    sent = 0
    answer = b""
    with socket.create_connection(("127.0.0.1", run.supervisor_port), timeout=10) as s:
        s.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n")
        try:
            while sent < 256 << 20:  # before the fix all of it was taken in, and more
                s.sendall(line * 64)
                sent += len(line) * 64
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            answer = s.recv(65536)
        except ConnectionResetError:
            pass
    assert sent < 256 << 20, "the supervisor kept reading headers without end"
    assert not answer or status_of(answer) == 431
    assert run.get("/ready")[0] == 200


def test_slow_and_silent_connections_are_closed(run):
    """A client that connects and says nothing, and one that sends a header byte at a time."""
    silent = socket.create_connection(("127.0.0.1", run.supervisor_port), timeout=30)
    slow = socket.create_connection(("127.0.0.1", run.supervisor_port), timeout=30)
    slow.sendall(b"GET /ready HTTP/1.1\r\nX-Slow: ")
    try:
        def closed(s: socket.socket) -> bool:
            try:
                s.setblocking(False)
                data = s.recv(65536)
            except BlockingIOError:
                return False
            except ConnectionResetError:
                return True
            finally:
                s.setblocking(True)
            return data == b"" or data.startswith(b"HTTP/1.1 408")

        def drip() -> bool:
            try:
                slow.sendall(b"a")
            except OSError:
                return closed(slow)
            return closed(slow)

        wait_for(lambda: drip() and closed(silent), 60, "both connections closed by the server", 0.5)
    finally:
        silent.close()
        slow.close()


def test_a_flood_of_garbage_is_answered_and_logged_once(run):
    for _ in range(300):
        assert status_of(raw(run.supervisor_port, b"\x00\xff garbage \r\n\r\n")) == 400
    assert run.get("/ready")[0] == 200
    assert run.output().count("malformed HTTP request") == 1


def test_more_idle_connections_than_descriptors_do_not_lock_out_probes(tag, base_env, tmp_path, no_survivors):
    """A container's usual 1,024-descriptor limit, and 1,100 connections that never send a byte."""
    ports = free_ports(3)
    args = ["--dp-size-local", "2", "--port", str(ports[1]), "--supervisor-port", str(ports[0]),
            "--host", "127.0.0.1", "--server-cmd", STANDIN_CMD,
            "--", "m"]
    limited = ["sh", "-c", 'ulimit -n 1024 && exec "$0" "$@"', *SUPERVISOR]
    run = SupervisorRun(args, base_env, tag, tmp_path, command=limited)
    idle: list[socket.socket] = []
    try:
        run.wait_ready()
        for _ in range(1100):
            idle.append(socket.create_connection(("127.0.0.1", ports[0]), timeout=10))
        # a probe on a fresh connection is answered although every descriptor was taken
        wait_for(lambda: _probe(ports[0]) == 200, 30, "/ready to answer beside 1,100 idle connections")
        assert run.get("/live")[0] == 200
        run.send(signal.SIGTERM)
        assert run.wait_exit() == 0, run.output()[-4000:]
    finally:
        for s in idle:
            s.close()
        run.close()
    out = run.output()
    assert "socket.accept() out of system resource" not in out and "cannot accept" not in out, out[-2000:]
    assert "Traceback" not in out, out[-4000:]


def _probe(port: int) -> int | None:
    try:
        return status_of(raw(port, get("/ready"), timeout=5))
    except (OSError, AssertionError):
        return None


def test_pipelined_requests_are_all_answered(run):
    answer = b""
    with socket.create_connection(("127.0.0.1", run.supervisor_port), timeout=10) as s:
        s.sendall(get("/live") * 200)
        deadline = time.monotonic() + 30
        while answer.count(b"HTTP/1.1 200") < 200 and time.monotonic() < deadline:
            answer += s.recv(65536)
    assert answer.count(b"HTTP/1.1 200") == 200


def test_a_probe_pipelined_behind_another_request_is_answered_in_its_turn(run):
    """Probes are answered at once, but never before an answer still owed on the connection."""
    answer = b""
    with socket.create_connection(("127.0.0.1", run.supervisor_port), timeout=10) as s:
        s.sendall(get("/status") + get("/ready/9") + get("/live") + get("/metrics") + get("/ready"))
        deadline = time.monotonic() + 30
        while answer.count(b"HTTP/1.1 ") < 5 and time.monotonic() < deadline:
            answer += s.recv(1 << 20)
    statuses = [int(part[:3]) for part in answer.split(b"HTTP/1.1 ")[1:]]
    assert statuses == [200, 404, 200, 200, 200]
    bodies = answer.split(b"HTTP/1.1 ")
    assert b'"ranks"' in bodies[1] and b"no rank 9" in bodies[2] and b"supervisor_ready" in bodies[4]
