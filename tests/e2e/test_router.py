"""The router end to end: the real CLI over stand-in ranks, requests through --router-port.

Passthrough, streaming, only ready ranks, a rank killed under load, a stream cut by a rank's
death, no rank ready, a stop with streams in flight, a worker SIGKILLed, bad requests; every
test ends with no process left (the `start` fixture checks)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from harness import FAST, Http, complete, get_raw, metrics, post, request, standin_metric, wait_for


def raw(run, data: bytes, timeout: float = 10) -> bytes:
    """Send bytes as they are; everything the router answers until it closes."""
    with socket.create_connection(("127.0.0.1", run.router_port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_requests_pass_through_unchanged_but_for_hop_by_hop_headers(start):
    run = start(2)
    run.wait_ready()
    body = bytes(range(256)) * 400  # 100 KiB, every byte value
    status, headers, answer = request(run, "PUT", "/echo?status=418&q=%20x", body, {
        "Authorization": "Bearer secret", "X-Custom": "kept", "Connection": "keep-alive, X-Hop", "X-Hop": "1",
        "X-Forwarded-For": "10.1.2.3"})
    assert status == 418 and "x-standin-rank" in headers
    echo = json.loads(answer)
    sent = {k.lower(): v for k, v in echo["headers"]}
    assert echo["method"] == "PUT" and echo["path"] == "/echo?status=418&q=%20x"
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert sent["authorization"] == "Bearer secret" and sent["x-custom"] == "kept"
    assert "x-hop" not in sent and "connection" not in sent
    assert sent["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"
    status, _, answer = request(run, "GET", "/v1/models")
    assert status == 200 and json.loads(answer)["data"][0]["id"] == "standin-model"
    status, headers, answer = request(run, "HEAD", "/v1/models")
    assert status == 200 and answer == b""
    assert request(run, "GET", "/no/such/path")[0] == 404  # the rank's own answer


def test_the_api_key_passes_through(start):
    run = start(1, "--api-key", "k1")
    run.wait_ready()
    assert complete(run)[0] == 401
    status, _, _ = request(run, "POST", "/v1/completions", b'{"prompt": "x"}', {"Authorization": "Bearer k1"})
    assert status == 200


def test_a_stream_passes_through_as_it_is_made(start):
    run = start(1, "--standin-stream-chunks", "6", "--standin-stream-delay", "0.3")
    run.wait_ready()
    conn = http.client.HTTPConnection("127.0.0.1", run.router_port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "x", "stream": True}))
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    first = response.readline()
    arrived = time.monotonic()
    rest = response.read()
    finished = time.monotonic()
    conn.close()
    assert first.startswith(b"data: ") and json.loads(first[6:])["choices"][0]["text"]
    assert rest.rstrip().endswith(b"data: [DONE]") and rest.count(b"data: ") == 6
    # The first chunk reached us while the rank was still writing the other five (0.3 s apart).
    assert finished - arrived >= 1.2


def test_a_client_that_stops_reading_stops_the_rank_writing(start):
    """Backpressure: the router reads from the rank only as fast as the client takes the bytes
    (else it would hold the whole answer in memory)."""
    chunks, pad = 2000, 40960  # ~80 MiB: more than every socket buffer on the way can hold
    run = start(1, "--standin-stream-chunks", str(chunks), "--standin-stream-pad", str(pad))
    run.wait_ready()
    port = run.status()["ranks"][0]["port"]
    sent = lambda: standin_metric(port, "standin_stream_chunks_sent_total")  # noqa: E731
    sock = socket.create_connection(("127.0.0.1", run.router_port), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    body = json.dumps({"prompt": "x", "stream": True, "max_tokens": chunks}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
    sock.recv(1024)  # the head and a little: the stream is flowing; now we stop reading

    def stalled() -> bool:
        before = sent()
        time.sleep(0.5)
        return before > 0 and sent() == before
    wait_for(stalled, 30, "the rank's writing to stall")
    assert sent() < chunks / 4, f"the rank wrote {sent()} of {chunks} chunks to a client that reads nothing"
    received = 0
    while data := sock.recv(1 << 20):  # read it all now: it arrives whole
        received += len(data)
        if data.endswith(b"0\r\n\r\n"):
            break
    sock.close()
    assert sent() == chunks and received > chunks * pad


def test_only_ready_ranks_get_requests(start):
    run = start(2, "--standin-ranks", "1", "--standin-load-seconds", "60")
    run.wait_ready(every_rank=False)  # ready on one of two, the default
    answered = Counter(complete(run)[1]["x-standin-rank"] for _ in range(20))
    assert answered == {"0": 20}
    assert run.status()["ranks"][1]["state"] == "starting"


def test_no_ready_rank_is_a_503_in_openais_shape_after_the_queue_timeout(start):
    run = start(1, "--standin-load-seconds", "60", options=["--router-queue-timeout", "0.3"])
    run.wait_api()
    status, headers, body = complete(run)
    assert status == 503 and headers["retry-after"] == "1"
    assert json.loads(body)["error"]["type"] == "service_unavailable"
    wait_for(lambda: metrics(run).get(("supervisor_router_no_ready_rank_total", ())) == 1, 5,
             "the 503 to be counted")


def test_a_rank_killed_under_load_costs_no_request_and_is_used_again_once_ready(start):
    run = start(2, "--standin-completion-delay", "0.02", options=FAST)
    run.wait_ready()
    errors: Counter = Counter()
    answered: list[tuple[float, str]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                status, headers, _ = complete(run)
                if status == 200:
                    answered.append((time.monotonic(), headers["x-standin-rank"]))
                else:
                    errors[status] += 1
            except OSError as exc:
                errors[type(exc).__name__] += 1

    clients = [threading.Thread(target=client) for _ in range(6)]
    for c in clients:
        c.start()
    try:
        wait_for(lambda: len(answered) > 50, 20, "traffic on both ranks")
        old = run.rank_pid(1)
        signal_sent = time.monotonic()
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: run.status()["ranks"][1]["attempt"] == 1 and run.get("/ready/1")[0] == 200, 20,
                 "rank 1 to be back")
        back = time.monotonic()
        wait_for(lambda: any(t > back and r == "1" for t, r in answered), 10, "rank 1 to get requests again")
    finally:
        stop.set()
        for c in clients:
            c.join()
    assert errors == Counter()
    assert any(t > signal_sent for t, _ in answered)


def test_a_stream_cut_with_no_rank_to_continue_it_ends_with_an_error_event(start):
    """The only rank dies mid-stream and is not back within --router-queue-timeout: the stream ends
    as an OpenAI client expects, an error event, then [DONE] (docs/router.md: Resumable streams)."""
    run = start(1, "--standin-die-mid-stream", "2", "--standin-stream-delay", "0.05",
                options=["--restart-policy", "on-failure", "--restart-backoff", "5", "--router-queue-timeout", "0.5"])
    run.wait_ready()
    status, _, body = complete(run, stream=True)  # a clean end: http.client read it whole
    assert status == 200
    events = [e.removeprefix(b"data: ") for e in body.strip().split(b"\n\n")]
    assert [json.loads(e)["choices"][0]["text"] for e in events[:2]] == ["h", "s"]  # the model's first two
    error = json.loads(events[2])["error"]
    assert error["code"] == 502 and "rank 0" in error["message"] and "no other rank ready" in error["message"]
    assert events[3] == b"[DONE]" and len(events) == 4
    wait_for(lambda: metrics(run).get(("supervisor_router_cut_streams_total", (("rank", "0"),))) == 1, 5,
             "the cut stream to be counted")


def test_a_rank_that_dies_before_answering_is_retried_elsewhere_or_answered_502(start):
    # Rank 0 dies on the first stream it is asked for, before sending a byte.
    run = start(2, "--standin-ranks", "0", "--standin-die-mid-stream", "0",
                # round-robin: of 6 streams, some land on rank 0 (least-requests sent all 6 to rank 1 once)
                options=[*FAST, "--max-restarts", "100", "--router-policy", "round-robin"])
    run.wait_ready()
    for _ in range(6):  # whichever rank each lands on, the client sees a whole answer
        status, _, body = complete(run, stream=True)
        assert status == 200 and body.rstrip().endswith(b"data: [DONE]") and b"error" not in body
        wait_for(lambda: run.all_ready(), 20, "both ranks ready")
    wait_for(lambda: metrics(run).get(("supervisor_router_retries_total", (("reason", "rank_failed"),)), 0) >= 1,
             5, "a retry after rank 0 died")
    assert "rank 0 exited" in run.output()


def test_a_rank_whose_engine_died_answers_no_client_and_is_replaced_at_once(start):
    # vLLM 0.32 keeps its API server up a moment after its engine dies: /health 503, and every
    # request a 500 with EngineDeadError's message. The router sends them elsewhere; one 503 is enough.
    run = start(2, "--standin-ranks", "0", "--standin-engine-dead-after", "1.5",
                options=[*FAST, "--router-policy", "round-robin", "--probe-interval", "30"])
    run.wait_ready()
    wait_for(lambda: request(run, "POST", "/v1/completions", b'{"prompt": "x"}')[1]["x-dp-rank"] == "1", 20,
             "the next request to go to rank 0")
    rank0 = run.status()["ranks"][0]["port"]
    wait_for(lambda: Http.get(rank0, "/health")[0] == 503, 10, "rank 0's engine dead (its probes are 30 s apart)")
    status, headers, body = request(run, "POST", "/v1/completions", b'{"prompt": "x"}')
    assert status == 200 and headers["x-dp-rank"] == "1", body  # sent to rank 0, answered by rank 1
    wait_for(lambda: run.status()["ranks"][0]["attempt"] >= 1, 10, "rank 0 replaced without waiting for 3 probes")
    assert "its engine died (/health answered 503)" in run.output()
    wait_for(lambda: metrics(run).get(("supervisor_router_retries_total", (("reason", "rank_failed"),))) == 1, 5,
             "the request sent again counted")


def test_sigterm_lets_streams_in_flight_finish_then_exits_0_and_says_what_it_waits_for(start):
    # 10 s of streams: a drain that lasts over 5 s says what it waits for (with 6 s, the drain
    # began ~1 s in and the streams once ended right at its 5th second, before either side spoke).
    run = start(2, "--standin-stream-chunks", "40", "--standin-stream-delay", "0.25",
                options=["--router-settle", "0.5"])
    run.wait_ready()
    results: list = []

    def stream() -> None:
        results.append(complete(run, stream=True, max_tokens=40))

    streams = [threading.Thread(target=stream) for _ in range(3)]
    for t in streams:
        t.start()
    wait_for(lambda: sum(r["inflight"] for r in run.status()["ranks"]) == 3, 10, "three streams in flight")
    run.send(signal.SIGTERM)
    wait_for(lambda: run.get("/ready")[0] == 503, 5, "/ready to turn 503")
    for t in streams:
        t.join()
    assert run.wait_exit() == 0, run.output()[-4000:]
    assert [r[0] for r in results] == [200] * 3
    assert all(r[2].rstrip().endswith(b"data: [DONE]") and r[2].count(b"data: ") == 41 for r in results)
    out = run.output()
    assert "router: no new connections; 3 request(s) in flight" in out
    assert re.search(r"router worker 0: draining: 3 connection\(s\) open, 3 of them answering; \d+ s left", out), out
    assert re.search(r"router worker 0 \(pid \d+\) still draining\n", out), out


def test_a_sigkilled_router_worker_is_replaced_and_the_pod_keeps_serving(start):
    run = start(2, options=["--router-workers", "2"])
    run.wait_ready()
    workers = run.status()["router"]["workers"]
    assert len(workers) == 2
    import os
    os.kill(workers[0]["pid"], signal.SIGKILL)
    for _ in range(40):  # during and after the restart: no refused connection, no error
        assert complete(run)[0] == 200
    wait_for(lambda: len(run.status()["router"]["workers"]) == 2 and run.status()["router"]["restarts"] == 1,
             10, "a new worker")
    assert workers[0]["pid"] not in [w["pid"] for w in run.status()["router"]["workers"]]
    assert "router worker 0 (pid" in run.output() and "killed by SIGKILL" in run.output()


@pytest.mark.parametrize(("data", "status"), [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n", 431),
    (b"POST /v1/completions HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", 413),
    (b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 501),
])
def test_bad_requests_get_a_clear_4xx_and_a_closed_connection(start, data, status):
    run = start(1, options=["--router-max-body", "1M"])
    run.wait_ready()
    answer = raw(run, data)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["type"] == "invalid_request_error"
    assert complete(run)[0] == 200  # and the router serves on


def test_a_body_over_the_limit_sent_in_full_is_refused_too(start):
    run = start(1, options=["--router-max-body", "64K"])
    run.wait_ready()
    status, _, body = request(run, "POST", "/v1/completions", b"x" * (65 << 10))
    assert status == 413 and b"--router-max-body" in body


def test_router_series_on_the_supervisors_metrics_and_inflight_in_status(start):
    run = start(2)
    run.wait_ready()
    for _ in range(4):
        assert complete(run)[0] == 200
    wait_for(lambda: sum(v for (name, labels), v in metrics(run).items()
                         if name == "supervisor_router_requests_total") == 4, 5, "4 requests counted")
    text = get_raw(run.supervisor_port, "/metrics")[1].decode()
    for series in ("supervisor_router_time_to_first_byte_seconds_bucket", "supervisor_router_retries_total",
                   "supervisor_router_workers 1.0", "supervisor_router_request_duration_seconds_count",
                   "supervisor_router_relayed_chunks_total", 'supervisor_router_worker_loop_lag_seconds{worker="0"}'):
        assert series in text
    status = run.status()
    assert [r["inflight"] for r in status["ranks"]] == [0, 0]
    assert status["router"]["port"] == run.router_port and status["router"]["policy"] == "least-requests"


def test_router_port_none_turns_it_off(start):
    run = start(1, options=["--router-port", "none"])
    run.wait_ready()
    assert run.status()["router"] is None and run.status()["ranks"][0]["inflight"] is None
    assert "; no router;" in run.output()


def test_an_operator_drain_keeps_the_router_serving(start):
    run = start(1, options=["--admin-token", "t"])
    run.wait_ready()
    assert post(run, "/drain", "t")[0] == 200
    assert run.get("/ready")[0] == 503
    assert complete(run)[0] == 200  # the pod is out of the Service; what still reaches it is served


def test_without_uvloop_the_router_serves_and_stops_cleanly(start, tmp_path):
    """uvloop is a dependency, but a platform may lack it: the stock loop then runs the workers.
    At the drain an accept under way fails with EINVAL (the socket was shut down under it); that
    is the stop, not an error, and must not print a traceback."""
    blocker = tmp_path / "no-uvloop"
    blocker.mkdir()
    (blocker / "uvloop.py").write_text("raise ImportError('uvloop is not installed here')\n")
    for _ in range(3):  # the accept race does not happen every time
        run = start(2, env={"PYTHONPATH": str(blocker)})
        run.wait_ready()
        assert complete(run)[0] == 200
        run.send(signal.SIGTERM)
        assert run.wait_exit() == 0, run.output()[-4000:]
        assert "Traceback" not in run.output() and "Error" not in run.output(), run.output()[-3000:]


def test_the_routers_port_keeps_the_backlog_the_supervisor_chose(start):
    """Each worker's accept loop listens again on the shared socket; it must not shrink the
    backlog (uvloop's default is 100: a burst of connections overflowed it)."""
    run = start(1, options=["--router-workers", "2"])
    run.wait_ready()
    wait_for(lambda: len(run.status()["router"]["workers"]) == 2, 10, "two workers")

    def backlog() -> int | None:
        out = subprocess.run(["ss", "-ltnH", f"sport = :{run.router_port}"], capture_output=True, text=True).stdout
        fields = out.split()
        return int(fields[2]) if len(fields) >= 3 else None
    kernel_cap = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert backlog() == min(socket.SOMAXCONN, kernel_cap) > 100
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]


def test_a_sigterm_under_kept_alive_load_loses_no_request(start):
    """Clients reuse their connections as the SDKs do; the pod is stopped under load. Every
    request that reached the router is answered (the ones after the drain with connection: close);
    the only refusals are new connections once the port stopped listening, which a client retries
    elsewhere."""
    run = start(2, options=["--router-settle", "0.3"])
    run.wait_ready()
    answers: list[tuple[float, object]] = []
    stop = threading.Event()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", run.router_port, timeout=30)
        while not stop.is_set():
            try:
                conn.request("POST", "/v1/completions", body=b'{"prompt": "hi", "max_tokens": 4}',
                             headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                answers.append((time.monotonic(), response.status))
            except (OSError, http.client.HTTPException) as exc:
                answers.append((time.monotonic(), type(exc).__name__))
                conn.close()
                if isinstance(exc, ConnectionRefusedError):
                    return  # the port stopped listening: a client goes elsewhere
                conn = http.client.HTTPConnection("127.0.0.1", run.router_port, timeout=30)
    clients = [threading.Thread(target=client) for _ in range(8)]
    for c in clients:
        c.start()
    wait_for(lambda: len(answers) > 200, 30, "the load to run")
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 0, run.output()[-4000:]
    stop.set()
    for c in clients:
        c.join()
    failed = Counter(s for _, s in answers if s != 200 and s != "ConnectionRefusedError")
    assert failed == Counter(), failed
