"""`make bench`: this supervisor measured against vLLM's own DPSupervisor and torchrun, in one run.

Every system drives the same stand-in ranks (tests/standin.py, which forks an "engine" child like
vLLM). Prints a Markdown table, writes bench/results/latest.md and a PNG of the latency
distributions. Load goes to loopback only; every system's processes carry a tag in their
environment, and the bench fails if any tagged process is left at its end.

    python bench/bench.py            # the full run (minutes)
    python bench/bench.py --smoke    # a few trials of each, for CI
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import router_bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import event_history  # the tests' harness, beside the stand-in the bench drives

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
BIN = Path(PY).parent
STANDIN = str(ROOT / "tests" / "standin.py")
TAG = "BENCH_TAG"
RESULTS = ROOT / "bench" / "results"


# ---------------------------------------------------------------- plumbing

_next_port = [21000 + os.getpid() % 100 * 80]


def free_ports(n: int) -> list[int]:
    while True:
        base = _next_port[0]
        _next_port[0] += n + 2
        if _next_port[0] > 60000:
            _next_port[0] = 21000
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return list(range(base, base + n))


def tagged(tag: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(TAG) == tag:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def kill_tagged(tag: str) -> int:
    left = tagged(tag)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)
    return len(left)


def status_code(port: int, path: str = "/ready", timeout: float = 2.0) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


class Poller:
    """GET /ready in a tight loop on one kept-alive connection (reconnecting when it drops)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def get(self) -> int | None:
        for _ in range(2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                self.conn.request("GET", "/ready")
                r = self.conn.getresponse()
                r.read()
                return r.status
            except (OSError, http.client.HTTPException):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
        return None

    def until(self, want_ok: bool, timeout: float) -> float | None:
        """perf_counter() of the first answer that is (want_ok) 200 or (not want_ok) anything else."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            code = self.get()
            if (code == 200) == want_ok:
                return time.perf_counter()
        return None


@dataclass
class Run:
    system: str
    proc: subprocess.Popen
    sup_port: int | None
    ports: list[int]
    tag: str
    stamps: Path

    def servers(self) -> list[psutil.Process]:
        """The rank servers (not their engine children), in port order."""
        found = {}
        for p in tagged(self.tag):
            try:
                cmd = p.cmdline()
                if STANDIN in cmd and "--port" in cmd:
                    parent = p.parent()
                    if parent is not None and STANDIN in parent.cmdline():
                        continue  # an engine fork
                    port = int(cmd[cmd.index("--port") + 1])
                    if "--standin-port-plus-local-rank" in cmd:
                        port += int(p.environ().get("LOCAL_RANK", "0"))
                    found[port] = p
            except (psutil.Error, ValueError, IndexError):
                continue
        return [found[p] for p in sorted(found)]

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if self.sup_port is not None and status_code(self.sup_port, timeout=1) == 200:
                return True
            if self.sup_port is None and len(list(self.stamps.iterdir())) >= len(self.ports):
                return True
            time.sleep(0.02)
        return False

    def gone_after(self, t0: float, timeout: float) -> float | None:
        """Seconds from t0 (perf_counter) until the supervisor exited and no tagged process lives."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None and not tagged(self.tag):
                return time.perf_counter() - t0
            time.sleep(0.005)
        return None

    def close(self) -> int:
        """Stop it the way an operator would (SIGTERM), so it cleans up after itself; whatever
        is still tagged afterwards is killed and counted."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + 10  # a guardian may still be removing files
        while tagged(self.tag) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = kill_tagged(self.tag)
        shutil.rmtree(self.stamps, ignore_errors=True)
        return left


def start(system: str, n: int, standin_args: tuple[str, ...] = (), options: tuple[str, ...] = (),
          interval: float = 5.0) -> Run:
    tag = uuid.uuid4().hex
    stamps = Path(tempfile.mkdtemp(prefix="bench-stamps-"))
    ports = free_ports(n + 2)
    sup, ranks, router = ports[0], ports[1:-1], ports[-1]
    standin = [*standin_args, "--standin-ready-stamp", str(stamps)]
    env = {**os.environ, TAG: tag, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(n)),
           "PYTHONUNBUFFERED": "1", "BENCH_STANDIN_ARGS": " ".join(standin)}
    env.pop("SUPERVISOR_ADMIN_TOKEN", None)
    if system == "ours":
        cmd = [PY, "-m", "vllm_dp_supervisor", "--dp-size-local", str(n), "--port", str(ranks[0]),
               "--supervisor-port", str(sup), "--host", "127.0.0.1", "--server-cmd", f"{PY} {STANDIN}",
               "--log-dir", "none", "--tee", "none", "--router-port", str(router), "--router-settle", "0",
               # what vLLM's DPSupervisor does, so the figures compare the same thing: unready
               # while any rank is down, and a rank's death ends the pod (a figure's options win)
               "--min-ready-ranks", str(n), "--restart-policy", "never",
               *options, "--", "bench-model", *standin]
    elif system == "vllm":
        cmd = [PY, str(ROOT / "bench" / "vllm_dp_driver.py"), "--ranks", str(n), "--port", str(ranks[0]),
               "--supervisor-port", str(sup), "--interval", str(interval)]
    elif system == "torchrun":
        sup = None
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(n), "--no-python", PY, STANDIN,
               "bench-model", "--host", "127.0.0.1", "--port", str(ranks[0]), "--standin-port-plus-local-rank",
               *standin]
    else:
        raise ValueError(system)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    return Run(system, proc, sup, ranks, tag, stamps)


# ---------------------------------------------------------------- results

@dataclass
class Row:
    figure: str
    system: str
    samples: list[float] = field(default_factory=list)  # seconds (or a count, see unit)
    unit: str = "ms"
    target: str = ""
    met: bool | None = None
    note: str = ""

    def stats(self) -> tuple[str, str, str]:
        if not self.samples:
            return "n/a", "n/a", "n/a"
        s = sorted(self.samples)
        scale = 1000 if self.unit == "ms" else 1
        p90 = s[min(len(s) - 1, round(0.9 * (len(s) - 1)))]
        fmt = (lambda v: f"{v * scale:.1f}") if self.unit == "ms" else (lambda v: f"{v:g}")
        return fmt(statistics.median(s)), fmt(p90), fmt(s[-1])


ROWS: list[Row] = []


def row(*args, **kw) -> Row:
    r = Row(*args, **kw)
    ROWS.append(r)
    print(f"  {r.figure} | {r.system}: {len(r.samples)} trial(s), median/p90/max {'/'.join(r.stats())} {r.unit}"
          + (f" ({r.note})" if r.note else ""), flush=True)
    return r


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000 if samples else float("inf")


def p99(samples: list[float]) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, round(0.99 * (len(s) - 1)))] if s else float("inf")


# ---------------------------------------------------------------- figures

RESTARTING = ("--restart-policy", "always", "--max-restarts", "1000000", "--restart-window", "1",
              "--restart-backoff", "0.05")


HOPS = ("SIGKILL -> exit seen on the pidfd (the kernel's teardown, the loop's wake-up)",
        "exit seen -> /ready turned (the verdict, published)", "/ready turned -> 503 seen by the client")


FIGURE_1_GOAL = "<= 4 ms median, <= 10 ms p99"  # idle, under /ready load and at 256 ranks alike


def figure_1_met(samples: list[float]) -> bool:
    return median_ms(samples) <= 4 and p99(samples) * 1000 <= 10


def kill_to_503(n: int, trials: int, options: tuple[str, ...] = (), extra_load=None,
                hops: dict[str, list[float]] | None = None) -> list[float]:
    """Ours: SIGKILL a rank, time the first non-200 on /ready. The rank is restarted between
    trials (restart policy always), so one supervisor serves every trial. `hops`: filled with
    the trials' times between the hops (HOPS), from the supervisor's own events."""
    run = start("ours", n, ("--standin-no-engine",) if n > 8 else (), (*RESTARTING, *options))
    try:
        if not run.wait_ready(120):
            raise RuntimeError("ours: not ready")
        return kill_trials(run, trials, hops)
    finally:
        run.close()


def kill_trials(run: Run, trials: int, hops: dict[str, list[float]] | None = None) -> list[float]:
    """SIGKILL rank (trial mod n) of a restarting supervisor; seconds to the first non-200."""
    samples, kills = [], []
    poller = Poller(run.sup_port)
    for trial in range(trials):
        if poller.until(True, 60) is None:
            print(f"  {run.system}: not ready again after a restart; {len(samples)} trial(s) kept", flush=True)
            break
        rank = trial % len(run.ports)
        pid = json.loads(_get(run.sup_port, "/status"))["ranks"][rank]["pid"]
        wall, t0 = time.time(), time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        t1 = poller.until(False, 30)
        if t1 is not None:
            samples.append(t1 - t0)
            kills.append((rank, wall, wall + (t1 - t0)))
    if hops is not None and kills:
        poller.until(True, 60)  # the last exit's event is published once its last words are in
        for name, seconds in zip(HOPS, hop_times(event_history(run.sup_port), kills), strict=True):
            hops.setdefault(name, []).extend(seconds)
    return samples


def hop_times(events: list[dict], kills: list[tuple[int, float, float]]) -> tuple[list[float], ...]:
    """Per kill (rank, when, when its 503 was seen): seconds to its exit's `detected_at`, from
    there to the `state` event that turned the rank `exited` (when /ready turned), and from there
    to the client's 503."""
    kernel, verdict, answer = [], [], []
    for rank, killed, seen in kills:
        exit_event = next((e for e in events if e["kind"] == "exit" and e["rank"] == rank
                           and e.get("detected_at", 0) >= killed), None)
        turned = next((e for e in events if e["kind"] == "state" and e["rank"] == rank and e["new"] == "exited"
                       and e["time"] >= killed), None)
        if exit_event is None or turned is None:
            continue
        kernel.append(exit_event["detected_at"] - killed)
        verdict.append(turned["time"] - exit_event["detected_at"])
        answer.append(seen - turned["time"])
    return kernel, verdict, answer


def _get(port: int, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", path)
    return conn.getresponse().read().decode()


@dataclass
class Lifecycle:
    ready_to_200: float | None = None   # figure 3
    kill_to_503: float | None = None    # figure 1
    crash_to_gone: float | None = None  # figure 6
    left: int = 0  # processes still alive when figure 6 gave up waiting


def lifecycle(system: str, n: int, interval: float = 5.0, load: float = 1.0) -> Lifecycle:
    """Start (ranks load `load` s), time last-rank-listening -> first 200, SIGKILL rank 0, time the
    first non-200, then time until the supervisor exited with everything gone."""
    out = Lifecycle()
    run = start(system, n, ("--standin-load-seconds", str(load)), interval=interval)
    try:
        poller = Poller(run.sup_port) if run.sup_port else None
        if poller is not None:
            t200 = poller.until(True, 120)
            stamps = [float(p.read_text()) for p in run.stamps.iterdir()]
            if t200 is not None and len(stamps) == n:
                wall200 = time.time() - (time.perf_counter() - t200)
                out.ready_to_200 = wall200 - max(stamps)
        elif not run.wait_ready(120):
            return out
        servers = run.servers()
        if not servers:
            return out
        t0 = time.perf_counter()
        servers[0].send_signal(signal.SIGKILL)
        if poller is not None:
            t1 = poller.until(False, 60)
            out.kill_to_503 = None if t1 is None else t1 - t0
        out.crash_to_gone = run.gone_after(t0, 30)
        if out.crash_to_gone is None:
            out.left = len(tagged(run.tag))
    finally:
        run.close()
    return out


def sigterm_to_gone(system: str, n: int, wedged: bool, options: tuple[str, ...] = (),
                    interval: float = 5.0, timeout: float = 120) -> float | None:
    run = start(system, n, ("--standin-ignore-sigterm",) if wedged else (), options, interval=interval)
    try:
        if not run.wait_ready(120):
            return None
        t0 = time.perf_counter()
        run.proc.send_signal(signal.SIGTERM)
        return run.gone_after(t0, timeout)
    finally:
        run.close()


def left_after_supervisor_kill(system: str, n: int, interval: float = 5.0) -> int | None:
    run = start(system, n, interval=interval)
    try:
        if not run.wait_ready(120):
            return None
        run.proc.send_signal(signal.SIGKILL)
        run.proc.wait()
        time.sleep(2.0)  # the figure is defined as what is alive 2 s later
        return len(tagged(run.tag))
    finally:
        run.close()


def hang_to_503(system: str, n: int, trials: int, interval: float = 5.0,
                options: tuple[str, ...] = ()) -> list[float]:
    samples = []
    for _ in range(trials):
        run = start(system, n, interval=interval, options=(*RESTARTING, *options) if system == "ours" else ())
        try:
            if not run.wait_ready(120):
                continue
            poller = Poller(run.sup_port)
            poller.until(True, 10)
            server = run.servers()[0]
            t0 = time.perf_counter()
            server.send_signal(signal.SIGSTOP)
            t1 = poller.until(False, 120)
            if t1 is not None:
                samples.append(t1 - t0)
        finally:
            run.close()
    return samples


# figure 7: /ready throughput

PLAIN_FASTAPI = """
import sys, uvicorn
from fastapi import FastAPI
from fastapi.responses import Response
app = FastAPI()
@app.get("/ready")
async def ready():
    return Response(status_code=200)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""

BARE_ASYNCIO = """
import asyncio, sys
RESP = b"HTTP/1.1 200 OK\\r\\ncontent-length: 0\\r\\n\\r\\n"
class P(asyncio.Protocol):
    def connection_made(self, t): self.t = t; self.buf = b""
    def data_received(self, d):
        self.buf += d
        while b"\\r\\n\\r\\n" in self.buf:
            _, self.buf = self.buf.split(b"\\r\\n\\r\\n", 1)
            self.t.write(RESP)
async def main():
    s = await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(sys.argv[1]))
    await s.serve_forever()
asyncio.run(main())
"""


def wrk(port: int, seconds: int) -> tuple[float, float] | None:
    """(requests/s, p99 ms) at concurrency 32, wrk pinned to core 1."""
    if shutil.which("wrk") is None:
        return None
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t", "1", "-c", "32", "-d", f"{seconds}s", "--latency",
                          f"http://127.0.0.1:{port}/ready"], capture_output=True, text=True, check=False).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    lat = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    if not rps or not lat:
        return None
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[lat.group(2)]
    return float(rps.group(1)), float(lat.group(1)) * scale


def pin(pid: int, core: int) -> None:
    try:
        os.sched_setaffinity(pid, {core})
    except OSError:
        pass


def throughput(seconds: int) -> dict[str, tuple[float, float] | None]:
    results: dict[str, tuple[float, float] | None] = {}
    run = start("ours", 8, options=("--probe-interval", "1"))
    try:
        if run.wait_ready(60):
            pin(run.proc.pid, 0)
            results["ours (/ready, 8 ranks probed)"] = wrk(run.sup_port, seconds)
    finally:
        run.close()
    for name, source in (("plain FastAPI route on uvicorn", PLAIN_FASTAPI), ("bare asyncio responder", BARE_ASYNCIO)):
        port = free_ports(1)[0]
        proc = subprocess.Popen([PY, "-c", source, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            pin(proc.pid, 0)
            deadline = time.monotonic() + 20
            while status_code(port, timeout=0.5) != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            results[name] = wrk(port, seconds)
        finally:
            proc.kill()
            proc.wait()
    return results


def kill_to_503_under_load(trials: int, seconds: int) -> list[float]:
    """Figure 1 again while wrk hammers /ready."""
    run = start("ours", 8, options=RESTARTING)
    samples = []
    try:
        if not run.wait_ready(60):
            return samples
        pin(run.proc.pid, 0)
        load = subprocess.Popen(["taskset", "-c", "1", "wrk", "-t", "1", "-c", "32", "-d", f"{seconds}s",
                                 f"http://127.0.0.1:{run.sup_port}/ready"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            samples = kill_trials(run, trials)
        finally:
            load.kill()
            load.wait()
    finally:
        run.close()
    return samples


def footprint(n: int, window: float) -> tuple[float, float] | None:
    """(CPU % of one core, RSS MB) of the supervisor with n ranks probed every second."""
    run = start("ours", n, ("--standin-no-engine",), ("--probe-interval", "1"))
    try:
        if not run.wait_ready(300):
            return None
        sup = psutil.Process(run.proc.pid)
        time.sleep(2)  # let start-up settle before the window
        c0, t0 = sum(sup.cpu_times()[:2]), time.monotonic()
        time.sleep(window)
        c1, t1 = sum(sup.cpu_times()[:2]), time.monotonic()
        return (c1 - c0) / (t1 - t0) * 100, sup.memory_info().rss / 2**20
    finally:
        run.close()


# ---------------------------------------------------------------- report

def machine() -> str:
    return (f"{platform.node() or 'this machine'}: {os.cpu_count()} cores "
            f"({platform.processor() or platform.machine()}), "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def markdown(extra: list[str]) -> str:
    lines = ["| figure | system | trials | median | p90 | max | unit | target | met |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in ROWS:
        med, p90, mx = r.stats()
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(f"| {r.figure} | {r.system}{' (' + r.note + ')' if r.note else ''} | {len(r.samples)} | "
                     f"{med} | {p90} | {mx} | {r.unit} | {r.target} | {met} |")
    return "\n".join(lines + [""] + extra)


def plot(path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    latency = [r for r in ROWS if r.unit == "ms" and r.samples]
    if not latency:
        return False
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(latency) + 1.5))
    ax.boxplot([[s * 1000 for s in r.samples] for r in latency], orientation="horizontal", whis=(0, 100))
    ax.set_yticks(range(1, len(latency) + 1), [f"{r.figure} | {r.system} {r.note}".strip()[:80]
                                               for r in latency], fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("milliseconds (log scale)")
    ax.set_title("vllm-dp-supervisor vs vLLM DPSupervisor vs torchrun: latency distributions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few trials of each figure, for CI")
    parser.add_argument("--router-only", action="store_true",
                        help="only the router figures (R1-R5), written to bench/results/router.md")
    args = parser.parse_args()
    smoke = args.smoke
    t_start = time.monotonic()
    notes: list[str] = []
    if args.router_only:
        return router_only(smoke, t_start)

    print("figure 1: rank SIGKILL -> first 503 on /ready", flush=True)
    hops: dict[str, list[float]] = {}
    f1 = kill_to_503(8, 5 if smoke else 40, hops=hops)
    row("1. SIGKILL -> 503 (8 ranks)", "ours", f1, target=FIGURE_1_GOAL,
        met=figure_1_met(f1))
    for name in HOPS:
        row(f"1. hop: {name}", "ours", hops.get(name, []))
    vllm_cycles = {5.0: [], 1.0: []}
    for interval in ((1.0,) if smoke else (5.0, 1.0)):
        for _ in range(1 if smoke else 3):
            vllm_cycles[interval].append(lifecycle("vllm", 8, interval))
    for interval, cycles in vllm_cycles.items():
        if cycles:
            row("1. SIGKILL -> 503 (8 ranks)", "vLLM DPSupervisor", [c.kill_to_503 for c in cycles if c.kill_to_503],
                note=f"{interval:g} s probes")
    ours_cycles = [lifecycle("ours", 8) for _ in range(2 if smoke else 8)]
    torch_cycles = [lifecycle("torchrun", 8) for _ in range(1 if smoke else 3)]

    print("figure 2: rank hung (SIGSTOP of the server) -> first 503", flush=True)
    f2 = hang_to_503("ours", 8, 1 if smoke else 3)
    row("2. SIGSTOP -> 503", "ours", f2, target="<= 3 x (1 s + 2 s) = 9 s", met=bool(f2) and max(f2) <= 9,
        note="defaults: 1 s interval, 2 s timeout, threshold 3")
    f2b = hang_to_503("ours", 8, 1 if smoke else 3, options=("--probe-interval", "5", "--probe-timeout", "5"))
    row("2. SIGSTOP -> 503", "ours", f2b, note="vLLM's settings: 5 s interval, 5 s timeout, threshold 3")
    if not smoke:
        f2v = hang_to_503("vllm", 8, 1, interval=1.0)
        row("2. SIGSTOP -> 503", "vLLM DPSupervisor", f2v, note="1 s probes")
    row("2. SIGSTOP -> 503", "torchrun", [], note="no readiness endpoint")

    print("figure 3: last rank healthy -> first 200", flush=True)
    f3 = [c.ready_to_200 for c in ours_cycles if c.ready_to_200 is not None]
    row("3. last rank healthy -> 200", "ours", f3, target="<= 250 ms", met=bool(f3) and max(f3) <= 0.25)
    for interval, cycles in vllm_cycles.items():
        if cycles:
            row("3. last rank healthy -> 200", "vLLM DPSupervisor",
                [c.ready_to_200 for c in cycles if c.ready_to_200 is not None], note=f"{interval:g} s probes")
    row("3. last rank healthy -> 200", "torchrun", [], note="no readiness endpoint")

    print("figure 4: SIGTERM -> exited, every process gone", flush=True)
    for wedged in (False, True):
        label = "wedged ranks (ignore SIGTERM)" if wedged else "well-behaved ranks"
        ours = [x for x in (sigterm_to_gone("ours", 8, wedged, ("--stop-timeout", "2"))
                            for _ in range(1 if smoke else 3)) if x is not None]
        row(f"4. SIGTERM -> all gone, {label}", "ours", ours, note="--stop-timeout 2",
            target="<= 2.5 s" if wedged else "", met=(bool(ours) and max(ours) <= 2.5) if wedged else None)
        if not smoke or not wedged:
            v = sigterm_to_gone("vllm", 8, wedged, interval=5.0)
            row(f"4. SIGTERM -> all gone, {label}", "vLLM DPSupervisor", [v] if v is not None else [],
                note="" if v is not None else "not gone within 120 s")
            t = sigterm_to_gone("torchrun", 8, wedged)
            row(f"4. SIGTERM -> all gone, {label}", "torchrun", [t] if t is not None else [],
                note="" if t is not None else "not gone within 120 s")

    print("figure 5: processes alive 2 s after the supervisor is SIGKILLed", flush=True)
    for system in ("ours", "vllm", "torchrun"):
        left = left_after_supervisor_kill(system, 8)
        name = {"ours": "ours", "vllm": "vLLM DPSupervisor", "torchrun": "torchrun"}[system]
        row("5. left 2 s after supervisor SIGKILL (of 16)", name, [] if left is None else [float(left)],
            unit="processes", target="0" if system == "ours" else "", met=(left == 0) if system == "ours" else None)

    print("figure 6: one rank crashes -> every other rank stopped, supervisor exited", flush=True)
    def crash_row(system: str, cycles: list[Lifecycle], note: str = "") -> None:
        stuck = [c.left for c in cycles if c.crash_to_gone is None]
        if stuck:
            note = (note + "; " if note else "") + (f"{len(stuck)} of {len(cycles)} run(s) never got there: "
                                                    f"{max(stuck)} process(es) still alive 30 s later")
        row("6. rank crash -> all stopped, exited", system, [c.crash_to_gone for c in cycles if c.crash_to_gone],
            note=note)
    crash_row("ours", ours_cycles)
    for interval, cycles in vllm_cycles.items():
        if cycles:
            crash_row("vLLM DPSupervisor", cycles, f"{interval:g} s probes")
    crash_row("torchrun", torch_cycles)

    print("figure 7: /ready throughput at concurrency 32 on one core", flush=True)
    seconds = 3 if smoke else 10
    tp = throughput(seconds)
    if all(v is None for v in tp.values()):
        notes.append("Figure 7 skipped: wrk is not installed.")
    else:
        base = tp.get("plain FastAPI route on uvicorn")
        bare = tp.get("bare asyncio responder")
        lines = ["| figure 7: GET /ready, wrk -c 32, server on 1 core | req/s | p99 ms | vs FastAPI "
                 "| vs bare asyncio |",
                 "|---|---|---|---|---|"]
        for name, v in tp.items():
            if v is None:
                lines.append(f"| {name} | n/a | n/a | | |")
                continue
            rel = f"{v[0] / base[0]:.2f}x" if base else ""
            rel2 = f"{v[0] / bare[0]:.2f}x" if bare else ""
            lines.append(f"| {name} | {v[0]:.0f} | {v[1]:.2f} | {rel} | {rel2} |")
        ours = tp.get("ours (/ready, 8 ranks probed)")
        if ours and base:
            lines.append(f"\nTarget: >= 1.5x the plain FastAPI route: "
                         f"{'met' if ours[0] >= 1.5 * base[0] else '**not met**'} ({ours[0] / base[0]:.2f}x).")
        notes.append("\n".join(lines))
        f7 = kill_to_503_under_load(5 if smoke else 30, 20 if smoke else 60)
        row("1. SIGKILL -> 503 under /ready load", "ours", f7, target=FIGURE_1_GOAL,
            met=figure_1_met(f7))

    print("figure 8: supervisor CPU and RSS", flush=True)
    lines = ["| figure 8: ranks, 1 s probes | supervisor CPU (% of a core) | RSS MB | target |", "|---|---|---|---|"]
    for n, target in ((8, "<= 1 %, <= 80 MB"), (64, ""), (256, "<= 5 % CPU")):
        if smoke and n > 8:
            continue
        fp = footprint(n, 5 if smoke else 15)
        lines.append(f"| {n} | {fp[0]:.2f} | {fp[1]:.0f} | {target} |" if fp else f"| {n} | n/a | n/a | {target} |")
    notes.append("\n".join(lines))
    if not smoke:
        f8 = kill_to_503(256, 10)
        row("1. SIGKILL -> 503 (256 ranks)", "ours", f8, target=FIGURE_1_GOAL,
            met=figure_1_met(f8))

    print("figures R1-R5: the router", flush=True)
    router_tables, r4 = router_bench.run(smoke)
    row("1. SIGKILL -> 503 under router load (c=16 through it)", "ours", [ms / 1000 for ms in r4],
        target="<= 2x figure 1's median", met=bool(r4) and median_ms([ms / 1000 for ms in r4]) <= 2 * median_ms(f1))
    notes.extend(router_tables)

    took = time.monotonic() - t_start
    how = (f"Measured on {machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
           f"{'smoke run' if smoke else 'full run'} in {took:.0f} s. Medians over trials; timings on a shared "
           "2-core machine are noisy, so compare within this run.\n\n"
           "How each system is driven: **ours** is `python -m vllm_dp_supervisor` over the stand-in (figure 1 uses "
           "`--restart-policy always` so one supervisor serves every trial; detection is the same code). "
           "**vLLM DPSupervisor** is the real class from the installed vLLM "
           "(`vllm.entrypoints.launchers.dp_supervisor`), its arguments parsed by vLLM's own `serve` parser "
           "(`--data-parallel-multi-port-external-lb`), with only its child entry function replaced by one that "
           "execs the same stand-in (`bench/vllm_dp_driver.py`); its defaults are a 5 s probe interval, 5 s "
           "timeout, threshold 3. **torchrun** is `torchrun --standalone --no-python` over the stand-in; it has "
           "no readiness endpoint, so figures 1-3 say n/a for it. Latencies are measured by a client polling "
           "`/ready` on a kept-alive connection: first non-200 (a 503 or a refused connection).")
    report = f"# Benchmark\n\n{how}\n\n{markdown(notes)}\n"
    print("\n" + report)
    if not smoke:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "latest.md").write_text(report)
        if plot(RESULTS / "latency.png"):
            print(f"wrote {RESULTS / 'latest.md'} and {RESULTS / 'latency.png'}")
    leftovers = [p for p in psutil.process_iter() if _is_bench(p)]
    if leftovers:
        print(f"bench: {len(leftovers)} process(es) left behind: {[p.pid for p in leftovers]}", file=sys.stderr)
        return 1
    return 0


def router_only(smoke: bool, t_start: float) -> int:
    print("figures R1-R5: the router", flush=True)
    tables, r4 = router_bench.run(smoke)
    idle = kill_to_503(2, 5 if smoke else 20)
    row("1. SIGKILL -> 503 (2 ranks, idle)", "ours", idle)
    row("1. SIGKILL -> 503 under router load (c=16 through it)", "ours", [ms / 1000 for ms in r4],
        target="<= 2x idle's median", met=bool(r4) and median_ms([ms / 1000 for ms in r4]) <= 2 * median_ms(idle))
    how = (f"Measured on {machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
           f"{'smoke run' if smoke else 'full run'} in {time.monotonic() - t_start:.0f} s, loopback only. "
           f"{router_bench.__doc__.split(chr(10) + chr(10))[0]}\n\n{router_bench.HOW}")
    report = f"# Router benchmark\n\n{how}\n\n{markdown(tables)}\n"
    print("\n" + report)
    if not smoke:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "router.md").write_text(report)
        print(f"wrote {RESULTS / 'router.md'}")
    leftovers = [p for p in psutil.process_iter() if _is_bench(p)]
    return 1 if leftovers else 0


def _is_bench(proc: psutil.Process) -> bool:
    try:
        return TAG in proc.environ() and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, OSError):
        return False


if __name__ == "__main__":
    sys.exit(main())
