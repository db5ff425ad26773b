"""A bounded chaos soak: stand-in ranks under steady load through the router (streamed and not)
while a seeded schedule SIGKILLs ranks, SIGSTOPs and resumes them, restarts them through the API,
rolls the pod (POST /rollout) and SIGKILLs a router worker; finally the supervisor gets SIGTERM.

Every request is accounted for: it succeeded, or failed for a reason the rules allow (a stream in
flight on a rank that was SIGKILLed continues on another rank, and ends with an error event naming
that rank only when no other rank was ready to take it; a request in flight on a router worker
that was SIGKILLed loses its connection), and the report counts each kind. At the end: no process,
no shared-memory segment and no run directory left; the
supervisor's RSS and open descriptors sampled over the run. Used by tests/e2e/test_soak.py (a short
run in `make test`) and `make soak` (minutes, SOAK_SECONDS).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import random
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable

import psutil
from harness import post, tagged_processes, wait_for
from load import Load

TOKEN = "soak-admin-t0ken"
# Each kind is done once first (in a seeded order), then drawn with these weights.
ACTIONS = {"kill_rank": 3, "pause_short": 2, "pause_long": 1, "api_restart": 2, "rollout": 1, "kill_worker": 1}
CUT_WINDOW_S = 5.0  # a failure is explained by a permitting event this recent


@dataclasses.dataclass
class Report:
    seconds: float
    outcomes: Counter
    actions: list[tuple[float, str, str]]  # (seconds into the run, action, detail)
    unexplained: list[str]
    rss_mb: tuple[float, float, float]  # first (after warm-up), max, last
    fds: tuple[int, int, int]
    leftovers: dict[str, list[str]]
    exit_code: int
    log: dict[str, int]  # how often the supervisor said what the actions should make it say

    def table(self) -> str:
        rows = ["| outcome | requests |", "|---|---|"]
        rows += [f"| {k} | {n:,} |" for k, n in sorted(self.outcomes.items(), key=lambda kv: -kv[1])]
        done = Counter(a for _, a, _ in self.actions)
        lines = [f"Soak of {self.seconds:.0f} s: {sum(self.outcomes.values()):,} requests, actions "
                 + ", ".join(f"{k} x{n}" for k, n in sorted(done.items())) + ", then SIGTERM.", "", *rows, "",
                 f"- unexplained failures: {len(self.unexplained)}",
                 f"- supervisor RSS: {self.rss_mb[0]:.1f} MiB after warm-up, max {self.rss_mb[1]:.1f}, "
                 f"last {self.rss_mb[2]:.1f} (growth {self.rss_mb[2] - self.rss_mb[0]:+.1f} MiB)",
                 f"- supervisor open fds: {self.fds[0]} after warm-up, max {self.fds[1]}, last {self.fds[2]} "
                 f"(growth {self.fds[2] - self.fds[0]:+d})",
                 "- the supervisor said: " + ", ".join(f"{k} x{n}" for k, n in self.log.items()),
                 f"- left after exit {self.exit_code}: processes {len(self.leftovers['processes'])}, shared-memory "
                 f"segments {len(self.leftovers['shm'])}, run directories {len(self.leftovers['run_dirs'])}"]
        return "\n".join(lines)


class Sampler(threading.Thread):
    """The supervisor's RSS and open descriptors, twice a second."""
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                self.samples.append((self.proc.memory_info().rss / 2**20, self.proc.num_fds()))
            except psutil.Error:
                return


STATUS_TIMEOUT_S = 60


def standin_args(tag: str) -> list[str]:
    return ["--standin-stream-chunks", "8", "--standin-stream-delay", "0.05", "--standin-completion-delay", "0.05",
            "--standin-shm", f"psm_soak_{tag[:8]}_{{rank}}"]


def options(tmp_path, stall_timeout: float = 1) -> list[str]:
    token = tmp_path / "soak-token"
    token.write_text(TOKEN)
    return ["--admin-token-file", str(token), "--restart-policy", "always", "--max-restarts", "1000",
            "--restart-backoff", "0.1", "--stable-after", "1", "--stall-timeout", str(stall_timeout),
            "--router-workers", "2", "--router-settle", "1", "--deep-probe-interval", "0"]


@dataclasses.dataclass
class Target:
    """What the schedule acts on, for stand-in ranks or for real vLLM."""
    body: dict | None = None  # the completion the clients send (None: the stand-in's)
    paused: Callable[[int], int] = lambda server_pid: server_pid  # the process a pause stops
    whole_timeout: float = 60.0  # how long the pod may take to be whole again after an action
    long_pause: float = 2.5  # well above the soak's --stall-timeout
    # Clients wait while a restarted rank loads: on 2 cores, a vLLM (CPU build) starting while
    # the other rank keeps its core busy can sit for minutes in sched_setaffinity.
    quiet_restarts: bool = False
    actions: tuple[str, ...] = tuple(ACTIONS)


def soak(run, tag: str, seconds: float, seed: int, clients: int = 6, target: Target | None = None) -> Report:
    """Run the schedule against a ready supervisor `run` (conftest.SupervisorRun); stop it; report."""
    target = target or Target()
    rng = random.Random(seed)
    kinds = list(target.actions)
    rng.shuffle(kinds)
    weights = {k: ACTIONS[k] for k in target.actions}
    sampler = Sampler(run.pid)
    actions: list[tuple[float, str, str]] = []
    permits: list[tuple[float, str]] = []  # (monotonic, what it permits: "rank N" or "worker")
    t0 = time.monotonic()
    with Load(run.router_port, clients=clients, body=target.body) as load:
        wait_for(lambda: load.total >= 20, 30, "traffic")
        sampler.start()
        while time.monotonic() - t0 < seconds or kinds:
            kind = kinds.pop() if kinds else rng.choices(list(weights), weights=list(weights.values()))[0]
            detail = _act(run, kind, rng, permits, target)
            actions.append((round(time.monotonic() - t0, 1), kind, detail))
            if target.quiet_restarts:
                load.pause()
            _wait_whole(run, target.whole_timeout)
            load.resume()
            time.sleep(rng.uniform(0.5, 1.5))
        sampler.stop.set()  # what the run grew to, before the stop releases it
        sampler.join()
        load.stopping()  # the pod is going away: no new request; those under way must finish
        run.send(signal.SIGTERM)
        exit_code = run.wait_exit(120)
        load.stop()
    unexplained = [f"{outcome}: {detail}" for at, outcome, detail in load.failed
                   if not _explained(at, outcome, detail, permits)]
    rss = [s[0] for s in sampler.samples[4:] or sampler.samples]
    fds = [s[1] for s in sampler.samples[4:] or sampler.samples]
    return Report(time.monotonic() - t0, load.outcomes, actions, unexplained,
                  (rss[0], max(rss), rss[-1]), (fds[0], max(fds), fds[-1]), leftovers(tag, run.pid), exit_code,
                  said(run.output()))


def _status(run) -> dict:
    """/status, waited for longer than a probe would: on 2 cores, with one vLLM engine busy and
    another tearing down and starting, the supervisor was seen to take over 5 s to answer."""
    code, body = run.get("/status", timeout=STATUS_TIMEOUT_S)
    assert code == 200, body
    return body


def _act(run, kind: str, rng: random.Random, permits: list[tuple[float, str]], target: Target) -> str:
    status = _status(run)
    rank = rng.randrange(len(status["ranks"]))
    pid, attempt = status["ranks"][rank]["pid"], status["ranks"][rank]["attempt"]
    replaced = lambda: _status(run)["ranks"][rank]["attempt"] > attempt  # noqa: E731
    if kind == "kill_rank":
        permits.append((time.monotonic(), f"rank {rank}"))
        os.kill(pid, signal.SIGKILL)
        # Seen before the next action picks a rank: a /status read right after the kill may
        # predate it, and the next kill would go to a pid already gone.
        wait_for(replaced, target.whole_timeout, f"rank {rank} to be restarted")
        return f"rank {rank} (pid {pid})"
    if kind in ("pause_short", "pause_long"):  # below --stall-timeout, or well above it
        pause, stopped = (0.3 if kind == "pause_short" else target.long_pause), target.paused(pid)
        os.kill(stopped, signal.SIGSTOP)
        time.sleep(pause)
        os.kill(stopped, signal.SIGCONT)
        return f"rank {rank} (pid {stopped}) stopped {pause:g} s"
    if kind == "api_restart":
        code, body = post(run, f"/ranks/{rank}/restart", TOKEN)
        assert code == 200, body
        wait_for(replaced, target.whole_timeout, f"rank {rank} to be restarted")
        return f"rank {rank}"
    if kind == "rollout":
        code, body = post(run, "/rollout", TOKEN)
        assert code == 200, body
        wait_for(lambda: _status(run)["rollout"]["state"] != "running", target.whole_timeout * 3, "the rollout to end")
        return f"{_status(run)['rollout']['state']}"
    worker = rng.choice(status["router"]["workers"])
    permits.append((time.monotonic(), "worker"))
    os.kill(worker["pid"], signal.SIGKILL)
    wait_for(lambda: worker["pid"] not in [w["pid"] for w in _status(run)["router"]["workers"]],
             target.whole_timeout, "the worker to be replaced")
    return f"worker {worker['worker']} (pid {worker['pid']})"


def _wait_whole(run, timeout: float) -> None:
    """Every rank ready and every router worker running again before the next action."""
    def whole() -> bool:
        status = _status(run)
        return status["ready"] and all(r["state"] == "ready" for r in status["ranks"]) and \
            len(status["router"]["workers"]) == 2 and (status["rollout"] or {}).get("state") != "running"
    wait_for(whole, timeout, "the pod to be whole again")


def _explained(at: float, outcome: str, detail: str, permits: list[tuple[float, str]]) -> bool:
    recent = {what for when, what in permits if 0 <= at - when <= CUT_WINDOW_S}
    if outcome == "cut_stream":  # a stream continues elsewhere; it is cut only when no rank could take it
        named = re.search(r"rank (\d+)", detail)
        return named is not None and f"rank {named.group(1)}" in recent and "no other rank ready" in detail
    # A SIGKILLed worker's sockets are reset under the clients it had accepted: one mid-read sees
    # a reset, one still writing its request a broken pipe (http.client sends headers and body apart).
    return outcome in ("cut_connection", "error_ConnectionResetError", "error_BrokenPipeError") and "worker" in recent


SAYINGS = {
    "rank stalled": re.compile(r"rank \d+ stalled:"),
    "judged working": re.compile(r"rank \d+ ready: .*: working, back in rotation"),
    "declared hung": re.compile(r"rank \d+ hung: requests got nothing back"),
    "drained": re.compile(r"ranks \[[\d, ]+\] drained in"),
    "rollout done": re.compile(r"rollout done"),
    "router worker replaced": re.compile(r"router worker \d+ \(pid \d+\) killed by SIGKILL"),
}


def said(output: str) -> dict[str, int]:
    return {what: len(pattern.findall(output)) for what, pattern in SAYINGS.items()}


def leftovers(tag: str, supervisor_pid: int) -> dict[str, list[str]]:
    return {
        "processes": [f"{p.pid} {' '.join(p.cmdline())[:80]}" for p in tagged_processes(tag)],
        "shm": glob.glob(f"/dev/shm/psm_soak_{tag[:8]}_*"),
        "run_dirs": [d for base in {os.environ.get("TMPDIR", "/tmp"), "/tmp"}
                     for d in glob.glob(f"{base}/vdps-{supervisor_pid}-*")],
    }
