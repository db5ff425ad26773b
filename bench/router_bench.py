"""The router figures of `make bench`: our router against direct access, nginx, HAProxy,
vllm-router and smg, over the same two fast stand-in ranks (bench/fast_rank.py) run by our
supervisor, with the same clients, loopback only, in one run.

Figures: R1 added latency (p50/p99 at c=1 and c=8, non-streaming) and time to the first SSE byte;
R2 max requests/s at c=8 and c=64 (ours with 1 and 2 workers) and the router's CPU per 1k
requests; R3 a rank SIGKILLed under load: client errors, and the time from the restarted rank's
listening to its first routed request; R4 SIGKILL -> that rank out of ours (/ready/<rank> 503)
while the router is under full load; R5 SIGTERM of the pod under load: failed requests.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
VENVS = ROOT / ".bench-venvs"  # vllm-router and smg, each in a venv of its own (make bench-tools)
RANK_CMD = f"{PY} {ROOT / 'bench' / 'fast_rank.py'}"
BODY = json.dumps({"model": "bench-model", "prompt": "hi", "max_tokens": 1})
STREAM_BODY = json.dumps({"model": "bench-model", "prompt": "hi", "stream": True})


HOW = ("How each is driven: our supervisor runs the two ranks (`bench/fast_rank.py`, uvloop + httptools, "
       "so the routers and not the ranks are measured) with `--restart-policy always`; the other routers are "
       "pointed at the same two rank ports with their own health checks: nginx (least_conn, keepalive 128, "
       "proxy_buffering off), HAProxy (leastconn, `option http-no-delay`, `check inter 1s`, retries 2 with "
       "redispatch), vllm-router (power_of_two) and smg (`launch`, round_robin), each in a venv of its own "
       "(`.bench-venvs`). Latency at c=1: one kept-alive Python client, 3,000 requests; c=8 and c=64: wrk, "
       "2 threads, POST with a Lua script. CPU: the router's processes' user+system time during the c=64 run. "
       "Everything shares 2 cores, so absolute figures are low; compare within the run.")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return True
        except OSError:
            pass
        time.sleep(0.02)
    return False


def get(port: int, path: str, timeout: float = 2) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()} | {"body": r.read()}
    finally:
        conn.close()


class Pod:
    """Our supervisor over two fast ranks; its router on or off."""

    def __init__(self, router: bool, workers: int = 1, tag: str = "", extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.sup, self.r0, self.router = free_port(), 0, free_port() if router else None
        base = free_port()
        while base + 1 > 65000 or not port_free(base + 1):
            base = free_port()
        self.ports = [base, base + 1]
        self.stamps = Path(tempfile.mkdtemp(prefix="bench-ranks-"))
        cmd = [PY, "-m", "vllm_dp_supervisor", "--dp-size-local", "2", "--min-ready-ranks", "2", "--port", str(base),
               "--supervisor-port", str(self.sup), "--host", "127.0.0.1", "--server-cmd", RANK_CMD,
               "--router-port", str(self.router) if router else "none", "--router-workers", str(workers),
               "--router-settle", "0.5", "--restart-policy", "always", "--max-restarts", "1000",
               "--restart-backoff", "0.1", "--stable-after", "1",  # every kill restarts in 0.1 s
               "--log-dir", "none", "--tee", "none", "--device", "none", *extra,
               "--", "bench-model", "--ready-stamp", str(self.stamps)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {}),
                                                         "BENCH_TAG": tag or uuid.uuid4().hex},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if not wait_until(lambda: get(self.sup, "/ready")[0] == 200, 30):
            self.close()
            raise RuntimeError("the supervisor over fast ranks did not get ready")

    def status(self) -> dict:
        return json.loads(get(self.sup, "/status")[1]["body"])

    def router_pids(self) -> list[int]:
        return [w["pid"] for w in self.status()["router"]["workers"]]

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        shutil.rmtree(self.stamps, ignore_errors=True)
        return code


class OtlpSink:
    """A collector that takes OTLP/HTTP exports and keeps nothing but their count."""

    def __init__(self) -> None:
        import http.server
        sink = self
        self.posts = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                sink.posts += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}/v1/traces"
        self.env = {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}

    def __enter__(self) -> OtlpSink:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def port_free(port: int) -> bool:
    """Can 127.0.0.1:`port` be bound now? (the stall bench uses it too)"""
    import socket
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


# ---------------------------------------------------------------- the other routers

def nginx(ports: list[int], port: int, tmp: Path, tuned: bool = False) -> list[str] | None:
    """`tuned`: a rank that fails once is left out for 1 s (max_fails=1 fail_timeout=1s), as its docs allow."""
    if shutil.which("nginx") is None:
        return None
    conf = tmp / "nginx.conf"
    mark = " max_fails=1 fail_timeout=1s" if tuned else ""
    servers = "".join(f"server 127.0.0.1:{p}{mark};" for p in ports)
    conf.write_text(f"""daemon off; worker_processes 1; pid {tmp}/nginx.pid; error_log stderr crit;
worker_rlimit_nofile 20000;
events {{ worker_connections 16384; }}
http {{ access_log off; client_body_temp_path {tmp}; proxy_temp_path {tmp};
  upstream ranks {{ least_conn; {servers} keepalive 128; }}
  server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://ranks; proxy_http_version 1.1;
    proxy_set_header Connection ""; proxy_buffering off; }} }} }}""")
    return ["nginx", "-c", str(conf), "-e", "stderr"]


def haproxy(ports: list[int], port: int, tmp: Path, tuned: bool = False) -> list[str] | None:
    """`tuned`: `retry-on all-retryable-errors` (a request the rank dropped goes to the other)."""
    if shutil.which("haproxy") is None:
        return None
    conf = tmp / "haproxy.cfg"
    servers = "\n".join(f"  server r{i} 127.0.0.1:{p} check inter 1s fall 1 rise 1" for i, p in enumerate(ports))
    conf.write_text(f"""global
  maxconn 4096
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  option http-no-delay
  retries 2
  option redispatch
{"  retry-on all-retryable-errors" if tuned else ""}
frontend f
  bind 127.0.0.1:{port}
  default_backend ranks
backend ranks
  balance leastconn
  option httpchk GET /health
{servers}
""")
    return ["haproxy", "-f", str(conf)]


# vllm-router's and smg's health checks as fast as they go: every second, one failure to leave,
# one success to come back (their defaults: 60 s and 5 s, 3 failures, 2 successes).
HEALTH_1S = ["--health-check-interval-secs", "1", "--health-check-timeout-secs", "1",
             "--health-failure-threshold", "1", "--health-success-threshold", "1"]


def vllm_router(ports: list[int], port: int, tmp: Path, tuned: bool = False) -> list[str] | None:
    exe = VENVS / "vllm-router" / "bin" / "vllm-router"
    if not exe.exists():
        return None
    return [str(exe), "--host", "127.0.0.1", "--port", str(port), "--policy", "power_of_two",
            "--log-level", "warning", *(HEALTH_1S if tuned else ()),
            "--worker-urls", *(f"http://127.0.0.1:{p}" for p in ports)]


def smg(ports: list[int], port: int, tmp: Path, tuned: bool = False) -> list[str] | None:
    exe = VENVS / "smg" / "bin" / "smg"
    if not exe.exists():
        return None
    return [str(exe), "launch", "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin",
            "--log-level", "warn", *(HEALTH_1S if tuned else ()),
            "--worker-urls", *(f"http://127.0.0.1:{p}" for p in ports)]


OTHERS = {"nginx 1.22 least_conn": nginx, "HAProxy 2.6 leastconn": haproxy,
          "vllm-router 0.1.17 power_of_two": vllm_router, "smg 1.13.0 round_robin": smg}
# Figure R3 again with each tuned as its docs allow, beside its defaults.
TUNED = {"nginx (max_fails=1 fail_timeout=1s)": functools.partial(nginx, tuned=True),
         "HAProxy (retry-on all-retryable-errors)": functools.partial(haproxy, tuned=True),
         "vllm-router (health checks every 1 s, 1 failure)": functools.partial(vllm_router, tuned=True),
         "smg (health checks every 1 s, 1 failure)": functools.partial(smg, tuned=True)}


class Other:
    def __init__(self, build: Callable[[list[int], int, Path], list[str] | None], ports: list[int]) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-router-"))
        self.port = free_port()
        cmd = build(ports, self.port, self.tmp)
        self.proc = None if cmd is None else subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if self.proc is not None and not wait_until(lambda: request(self.port)[0] == 200, 60):
            self.close()
            self.proc = None

    def pids(self) -> list[int]:
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.Error:
            return []

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------- clients

def request(port: int, conn: http.client.HTTPConnection | None = None,
            stream: bool = False) -> tuple[int | str, str, float, float]:
    """(status or error, rank pid, seconds to first byte, seconds in all) of one POST."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", body=STREAM_BODY if stream else BODY,
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        first = r.read(1)
        ttfb = time.perf_counter() - t0
        r.read()
        return r.status if first or r.status else "empty", r.getheader("x-rank-pid", ""), ttfb, time.perf_counter() - t0
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        return type(exc).__name__, "", 0.0, time.perf_counter() - t0
    finally:
        if own:
            conn.close()


def latency(port: int, n: int) -> tuple[float, float]:
    """p50 and p99 ms of `n` POSTs, one at a time on a kept-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(100):
        request(port, conn)
    samples = sorted(request(port, conn)[3] for _ in range(n))
    conn.close()
    return samples[len(samples) // 2] * 1000, samples[int(len(samples) * 0.99)] * 1000


def ttfb(port: int, n: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    samples = sorted(request(port, conn, stream=True)[2] for _ in range(n))
    conn.close()
    return samples[len(samples) // 2] * 1000


WRK_LUA = f'wrk.method = "POST"\nwrk.body = \'{BODY}\'\nwrk.headers["Content-Type"] = "application/json"\n'


def wrk(port: int, connections: int, seconds: int, pids: list[int]) -> tuple[float, float, float] | None:
    """(requests/s, p99 ms, router CPU seconds per 1k requests) with wrk on 2 threads."""
    if shutil.which("wrk") is None:
        return None
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(WRK_LUA)
    before = _cpu(pids)
    out = subprocess.run(["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", "--latency", "-s",
                          str(script), f"http://127.0.0.1:{port}/v1/completions"],
                         capture_output=True, text=True, check=False).stdout
    cpu = _cpu(pids) - before
    script.unlink()
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    lat = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    if not rps or not lat:
        return None
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[lat.group(2)]
    total = float(rps.group(1)) * seconds
    return float(rps.group(1)), float(lat.group(1)) * scale, cpu / total * 1000 if total else 0.0


def burst(port: int, connections: int, seconds: int, pids: Callable[[], list[int]]) -> dict | None:
    """R6: `connections` clients at once (wrk, 2 threads, 10 s timeout): p50 and p99 ms, errors (wrk's
    socket errors and non-2xx answers), the router processes' largest RSS during the run (MiB),
    and the kernel's listen-queue overflows meanwhile (TcpExt ListenOverflows, every socket)."""
    if shutil.which("wrk") is None:
        return None
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(WRK_LUA)
    overflows, rss, done = _listen_overflows(), [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            rss[0] = max(rss[0], sum(_rss(pid) for pid in pids()))
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        out = subprocess.run(["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", "--timeout", "10s",
                              "--latency", "-s", str(script), f"http://127.0.0.1:{port}/v1/completions"],
                             capture_output=True, text=True, check=False).stdout
    finally:
        done.set()
        sampler.join()
        script.unlink()
    ms = {}
    for q in ("50", "99"):
        m = re.search(rf"{q}%\s+([\d.]+)(us|ms|s)", out)
        ms[q] = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)] if m else float("nan")
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = re.search(r"(\d+) requests in", out)
    errors = (sum(int(g) for g in socket_errors.groups()) if socket_errors else 0) + \
        (int(non2xx.group(1)) if non2xx else 0)
    return {"p50": ms["50"], "p99": ms["99"], "errors": errors, "requests": int(total.group(1)) if total else 0,
            "rss": rss[0] / 2**20, "overflows": _listen_overflows() - overflows,
            "detail": socket_errors.group(0) if socket_errors else ""}


def _listen_overflows() -> int:
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=True)).get("ListenOverflows", 0))
    return 0


def _rss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


class Load:
    """`clients` threads POSTing in a loop; what each answer was, when, and from which rank."""

    def __init__(self, port: int, clients: int) -> None:
        self.port = port
        self.answers: list[tuple[float, int | str, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self._stop.is_set():
            status, pid, _, _ = request(self.port, conn)
            self.answers.append((time.time(), status, pid))
            if status != 200:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def errors(self, since: float = 0.0) -> int:
        return sum(1 for t, s, _ in self.answers if s != 200 and t >= since)


def rank_kill(pod: Pod, port: int, seconds: float) -> tuple[int, float | None, float | None]:
    """Kill rank 1 under load at c=8: (client errors, seconds from the new rank's listening to the
    first request it answered (None if it got none within `seconds`), and the same from the moment
    our supervisor declared it ready)."""
    wait_until(lambda: get(pod.sup, "/ready")[0] == 200, 30)
    time.sleep(1.5)  # ready for longer than --stable-after: restarted within 0.1 s
    load = Load(port, 8)
    try:
        time.sleep(1.0)
        old = pod.status()["ranks"][1]["pid"]
        killed = time.time()
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: pod.status()["ranks"][1]["pid"] not in (None, old), 10)
        new = pod.status()["ranks"][1]["pid"]
        stamp = pod.stamps / str(new)
        wait_until(stamp.exists, 10)
        wait_until(lambda: any(p == str(new) for _, _, p in load.answers[-2000:]), seconds)
    finally:
        load.stop()
    listening = float(stamp.read_text()) if stamp.exists() else None
    first = next((t for t, s, p in load.answers if p == str(new) and s == 200), None)
    rank = pod.status()["ranks"][1]
    ready = rank["started_at"] + rank["ready_after_s"] if rank.get("ready_after_s") is not None else None
    del killed
    return (load.errors(), (first - listening) if first and listening else None,
            (first - ready) if first and ready else None)


def kill_to_unready_under_load(pod: Pod, trials: int) -> list[float]:
    """R4: ours, wrk at c=16 through the router (another process: load threads in this one would
    take the GIL from the measuring loop); SIGKILL rank 1 -> /ready/1 answers 503 (ms)."""
    samples: list[float] = []
    if shutil.which("wrk") is None:
        return samples
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(WRK_LUA)
    load = subprocess.Popen(["wrk", "-t", "1", "-c", "16", "-d", "600s", "-s", str(script),
                             f"http://127.0.0.1:{pod.router}/v1/completions"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    try:
        for _ in range(trials):
            if not wait_until(lambda: get(pod.sup, "/ready/1")[0] == 200, 20):
                continue
            time.sleep(1.5)  # ready for longer than --stable-after: the next restart is quick too
            pid = pod.status()["ranks"][1]["pid"]
            conn = http.client.HTTPConnection("127.0.0.1", pod.sup, timeout=5)
            t0 = time.perf_counter()
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            while True:
                conn.request("GET", "/ready/1")
                r = conn.getresponse()
                r.read()
                if r.status != 200:
                    samples.append((time.perf_counter() - t0) * 1000)
                    break
            conn.close()
    finally:
        load.kill()
        load.wait()
        script.unlink()
    return samples


def sigterm_under_load(workers: int = 1) -> tuple[dict, int, int]:
    """R5: c=8 through our router, then SIGTERM to the pod: (failed before the router stopped
    accepting, requests answered, supervisor exit code). Clients stop once connections are refused:
    by then /ready had been 503 for --router-settle and a load balancer would have moved them."""
    pod = Pod(router=True, workers=workers)
    load = Load(pod.router or 0, 8)
    time.sleep(1.0)
    sent = time.time()
    pod.proc.send_signal(signal.SIGTERM)
    code = pod.proc.wait(60)
    load.stop()
    pod.close()
    # After the settle time the port stops accepting: what clients see then is a refused
    # connection, which a client retries elsewhere; failures before that are what count.
    refused_from = min((t for t, s, _ in load.answers if s == "ConnectionRefusedError" and t > sent),
                       default=float("inf"))
    failed: dict = {}
    for t, s, _ in load.answers:
        if s != 200 and t < refused_from:
            failed[s] = failed.get(s, 0) + 1
    return failed, sum(1 for _, s, _ in load.answers if s == 200), code


def run(smoke: bool) -> tuple[list[str], list[float]]:
    """Every router figure; markdown tables, goals marked met or not."""
    n_lat, secs = (300, 2) if smoke else (3000, 8)
    lines = ["| figure R1-R2 (POST /v1/completions, small JSON) | p50 c=1 ms | p99 c=1 ms | added p50 ms "
             "| SSE first byte ms | req/s c=8 | p99 c=8 ms | req/s c=64 | CPU s per 1k req |",
             "|---|---|---|---|---|---|---|---|---|"]
    results: dict[str, dict] = {}
    pod = Pod(router=True, workers=1)
    try:
        direct = pod.ports[0]
        skipped = []

        def measure(name: str, port: int, pids: Callable[[], list[int]]) -> None:
            p50, p99 = latency(port, n_lat)
            r = {"p50": p50, "p99": p99, "ttfb": ttfb(port, n_lat // 10)}
            r["c8"] = wrk(port, 8, secs, pids())
            r["c64"] = wrk(port, 64, secs, pids())
            results[name] = r

        measure("direct to one rank (the floor)", direct, lambda: [])
        measure("ours, 1 worker", pod.router or 0, pod.router_pids)
        if not smoke:
            with OtlpSink() as sink:  # the same, every request traced to a local collector
                traced = Pod(router=True, workers=1, extra=("--otlp-traces-endpoint", sink.endpoint), env=sink.env)
                try:
                    measure("ours, 1 worker, traces on", traced.router or 0, traced.router_pids)
                finally:
                    traced.close()
                results["ours, 1 worker, traces on"]["exports"] = sink.posts
        for name, build in ({} if smoke else OTHERS).items():  # one at a time: none idles beside another
            other = Other(build, pod.ports)
            try:
                if other.proc is None:
                    skipped.append(name)
                else:
                    measure(name, other.port, other.pids)
            finally:
                other.close()
    finally:
        pod.close()
    pod2 = Pod(router=True, workers=2)
    try:
        r = {"p50": latency(pod2.router or 0, n_lat)[0], "p99": float("nan"), "ttfb": float("nan")}
        r["c8"] = wrk(pod2.router or 0, 8, secs, pod2.router_pids())
        r["c64"] = wrk(pod2.router or 0, 64, secs, pod2.router_pids())
        results["ours, 2 workers"] = r
    finally:
        pod2.close()
    floor = results["direct to one rank (the floor)"]["p50"]
    for name, r in results.items():
        c8, c64 = r["c8"], r["c64"]
        lines.append(f"| {name} | {r['p50']:.3f} | {r['p99']:.3f} | {r['p50'] - floor:+.3f} | {r['ttfb']:.3f} | "
                     + (f"{c8[0]:,.0f} | {c8[1]:.2f} | " if c8 else "n/a | n/a | ")
                     + (f"{c64[0]:,.0f} | {c64[2]:.3f} |" if c64 else "n/a | n/a |"))
    if not smoke and skipped:
        lines.append(f"\nNot measured (not installed, or no 200 within 60 s of its start): {', '.join(skipped)}.")

    kill_lines = ["| figure R3: rank 1 SIGKILLed under load (c=8), restarted by the supervisor | client errors "
                  "| restarted rank's first request after it listens |", "|---|---|---|"]
    pod = Pod(router=True)
    try:
        errors, heard, back = rank_kill(pod, pod.router or 0, 10)
        results["kill ours"] = {"errors": errors, "back": back}
        kill_lines.append(f"| ours | {errors} | " + (f"{heard * 1000:.0f} ms" if heard is not None else "never")
                          + (f" ({back * 1000:.1f} ms after the supervisor saw it ready: its startup probe, every "
                             f"0.2 s, finds it listening) |" if back is not None else " |"))
        if not smoke:
            for name, build in (*OTHERS.items(), *TUNED.items()):
                other = Other(build, pod.ports)
                if other.proc is None:
                    continue
                try:
                    e, b, _ = rank_kill(pod, other.port, 90)
                    kill_lines.append(f"| {name} | {e} | " + (f"{b:.1f} s |" if b is not None else "not within 90 s |"))
                finally:
                    other.close()
        r4 = kill_to_unready_under_load(pod, 3 if smoke else 10)
    finally:
        pod.close()
    # R5: SIGTERM of the pod under load, again and again (each a fresh pod)
    stops = [sigterm_under_load() for _ in range(2 if smoke else 10)]
    failed: dict = {}
    for f, _, _ in stops:
        for kind, n in f.items():
            failed[kind] = failed.get(kind, 0) + n
    answered, codes = sum(a for _, a, _ in stops), {c for _, _, c in stops}
    code = codes.pop() if len(codes) == 1 else max(codes)

    # R6: a burst of connections through our router (1 worker) and nginx, in the same run
    burst_lines = ["| figure R6: concurrent connections | router | p50 ms | p99 ms | errors | requests | "
                   "router RSS MiB | listen overflows |", "|---|---|---|---|---|---|---|---|"]
    bursts: dict[tuple[str, int], dict] = {}
    pod = Pod(router=True)
    try:
        for n in (1000,) if smoke else (1000, 5000):
            for name, build in (("ours, 1 worker", None), ("nginx 1.22 least_conn", nginx)):
                other = Other(build, pod.ports) if build is not None else None
                try:
                    if other is not None and other.proc is None:
                        continue
                    port = other.port if other is not None else pod.router or 0
                    pids = other.pids if other is not None else pod.router_pids
                    b = burst(port, n, 3 if smoke else 10, pids)
                finally:
                    if other is not None:
                        other.close()
                if b is not None:
                    bursts[(name, n)] = b
                    burst_lines.append(f"| {n:,} | {name} | {b['p50']:.1f} | {b['p99']:.1f} | {b['errors']} "
                                       f"{b['detail']} | {b['requests']:,} | {b['rss']:.0f} | {b['overflows']} |")
    finally:
        pod.close()

    ours, nginx_r = results["ours, 1 worker"], results.get("nginx 1.22 least_conn")
    two, vr = results["ours, 2 workers"], results.get("vllm-router 0.1.17 power_of_two")
    r4_median = sorted(r4)[len(r4) // 2] if r4 else float("nan")
    goals = ["| router goal | measured | met |", "|---|---|---|"]
    if nginx_r:
        added, nginx_added = ours["p50"] - floor, nginx_r["p50"] - floor
        goals.append(f"| added p50 <= nginx's + 0.1 ms | ours {added:+.3f} ms, nginx {nginx_added:+.3f} ms | "
                     f"{'met' if added <= nginx_added + 0.1 else '**not met**'} |")
    if vr and vr["c64"] and two["c64"]:
        goals.append(f"| req/s with 2 workers >= vllm-router's (c=64) | {two['c64'][0]:,.0f} vs {vr['c64'][0]:,.0f} | "
                     f"{'met' if two['c64'][0] >= vr['c64'][0] else '**not met**'} |")
    back = results["kill ours"]["back"]
    goals.append(f"| 0 client errors on a rank kill | {results['kill ours']['errors']} | "
                 f"{'met' if results['kill ours']['errors'] == 0 else '**not met**'} |")
    goals.append("| re-admission within 50 ms of ready | " + (f"{back * 1000:.1f} ms" if back is not None else "never")
                 + f" | {'met' if back is not None and back <= 0.05 else '**not met**'} |")
    goals.append(f"| 0 failed requests over {len(stops)} pod SIGTERMs (c=8, kept-alive connections) | "
                 f"{sum(failed.values())} failed {failed or ''}, {answered} answered, exit {code} | "
                 f"{'met' if not failed and code == 0 else '**not met**'} |")
    for n in sorted({n for _, n in bursts}):
        ours_b, nginx_b = bursts.get(("ours, 1 worker", n)), bursts.get(("nginx 1.22 least_conn", n))
        if ours_b and nginx_b:
            ok = ours_b["errors"] == 0 and ours_b["p99"] <= 2 * nginx_b["p99"]
            goals.append(f"| {n:,} connections at once: 0 errors, p99 within 2x nginx's | {ours_b['errors']} "
                         f"errors, p99 {ours_b['p99']:.0f} ms vs nginx {nginx_b['p99']:.0f} ms | "
                         f"{'met' if ok else '**not met**'} |")
    traced = results.get("ours, 1 worker, traces on")
    if traced:
        goals.append(f"| traces on: what a traced request costs | p50 {traced['p50'] - ours['p50']:+.3f} ms, "
                     f"req/s c=64 {traced['c64'][0] if traced['c64'] else float('nan'):,.0f} vs "
                     f"{ours['c64'][0] if ours['c64'] else float('nan'):,.0f} ({traced['exports']} exports) | "
                     "no goal: off is the default, and costs one `is None` per request |")
    goals.append(f"| SIGKILL -> /ready/<rank> 503 under router load within 2x of idle (figure 1) | "
                 f"median {r4_median:.2f} ms | see figure 1's median |")
    return ["\n".join(lines), "\n".join(kill_lines), "\n".join(burst_lines), "\n".join(goals)], r4
