"""What the supervisor and a router worker say to each other, one JSON object per line over a Unix
socket pair: the one place both sides build and read every message.

Supervisor → worker:
- `{"settings": {...}}`, first and once: the worker's `RouterSettings`;
- `{"view": {"v": N, "ready": [[rank, port, attempt], ...], "engines": [[rank, attempt, caching],
  ...]}}` on every change of the published view and once a second (so a worker that missed one
  catches up): the ranks it may route to, and every rank's current attempt and whether its engine
  keeps its cache (the cache policy drops an index whose engine ended);
- `{"hand_off": [rank, ...]}` when a planned stop of those ranks has waited --drain-timeout: the
  streams they still carry continue on other ranks;
- `{"drain": SECONDS}` at the stop.

Worker → supervisor:
- `{"stats": {...}}` twice a second (stats.py);
- `{"load": {"v": N, "inflight": {rank: n}, "stalled": [rank, ...]}}` on taking view N and
  whenever a request ends on a rank no longer in its view (the supervisor waits on these to stop a
  drained rank);
- `{"unreachable": [rank, attempt, why]}` when it could not connect to a rank it was told is ready;
- `{"stalled": [rank, attempt, seconds, requests]}` once a second while a ready rank holds its
  requests and sends nothing back for --stall-timeout (activity.py);
- `{"resumed": [from_rank, to_rank, tokens, seconds]}` when a stream cut on one rank went on on
  another, `tokens` in, its first byte out `seconds` after the cut (passage.py).

A reader takes what it can use and skips the rest: a malformed message is dropped, never raised.

Must never import the supervisor's side (`core`, `loops`, `procs`, `api`): both sides import this
module, and a worker loads only what it routes with. The supervisor's side turns what it reads
here into the machine's observations (router_workers/workers.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, TypedDict, cast

from vllm_dp_supervisor.settings.config import ModelSource, RouterPolicy, RouterSettings

MAX_LINE = 1 << 20  # a stats message of a few hundred ranks is tens of KiB
WHY_CHARS = 200  # a worker's reason, as the supervisor keeps it


def encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


async def read(reader: asyncio.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """Messages until the other side closes; a line that is not a JSON object is skipped."""
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except (asyncio.IncompleteReadError, ConnectionError):  # closed, or reset as the other side exited
            return
        except asyncio.LimitOverrunError as exc:
            await reader.readexactly(exc.consumed)  # drop the oversized line, keep the channel
            continue
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict):
            yield message


# ---- supervisor → worker ----

def settings_message(settings: RouterSettings) -> bytes:
    return encode({"settings": {**dataclasses.asdict(settings), "policy": settings.policy.value}})


def read_settings(message: Mapping[str, Any]) -> RouterSettings:
    """The worker's settings; ValueError if `message` is not a settings message it can use."""
    try:
        fields = dict(message["settings"])
        fields["policy"] = RouterPolicy(fields["policy"])
        fields["kv_events"] = tuple((int(r), str(e), None if p is None else str(p)) for r, e, p in fields["kv_events"])
        fields["model"] = None if fields["model"] is None else \
            ModelSource(**{**fields["model"], "names": tuple(fields["model"].get("names", ()))})
        at = fields.get("metrics_at")
        fields["metrics_at"] = None if at is None else (str(at[0]), int(at[1]))
        return RouterSettings(**fields)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a settings message: {exc}") from None


def view_message(version: int, ready: Iterable[tuple[int, int, int]],
                 engines: Iterable[tuple[int, int, bool]]) -> bytes:
    """`ready`: (rank, port, attempt) of the ranks a worker may route to; `engines`: (rank,
    attempt, caching) of every rank."""
    return encode({"view": {"v": version, "ready": [list(r) for r in ready], "engines": [list(e) for e in engines]}})


@dataclasses.dataclass(frozen=True)
class View:
    version: int
    ready: dict[int, tuple[int, int]]  # rank → (port, attempt)
    engines: dict[int, tuple[int, bool]]  # rank → (attempt, its engine keeps its cache)


def read_view(message: Mapping[str, Any]) -> View | None:
    """A view message; None for another message."""
    view = message.get("view")
    if not isinstance(view, dict):
        return None
    try:
        return View(int(view.get("v", 0)),
                    {int(rank): (int(port), int(attempt)) for rank, port, attempt in view.get("ready", [])},
                    {int(rank): (int(attempt), bool(caching)) for rank, attempt, caching in view.get("engines", [])})
    except (TypeError, ValueError):
        return None


def hand_off_message(ranks: list[int]) -> bytes:
    return encode({"hand_off": ranks})


def read_hand_off(message: Mapping[str, Any]) -> list[int] | None:
    """The ranks to hand off; None for another message."""
    ranks = message.get("hand_off")
    try:
        return [int(r) for r in ranks] if isinstance(ranks, list) else None
    except (TypeError, ValueError):
        return None


def drain_message(budget_s: float) -> bytes:
    return encode({"drain": budget_s})


def read_drain(message: Mapping[str, Any]) -> float | None:
    """The drain's budget in seconds; None for another message."""
    budget = message.get("drain")
    return float(budget) if isinstance(budget, int | float) else None


# ---- worker → supervisor ----

HistogramCounts = list  # [per-bucket counts (not cumulative), sum]: stats.Histogram's


class StatsReport(TypedDict):
    """A worker's counters since it started (stats.WorkerStats.report). The supervisor keeps the
    latest of each worker and sums them (router_workers/collector.py)."""
    requests: list[list[Any]]  # [rank, code class, endpoint family, count]
    retries: dict[str, int]  # by reason
    cut_streams: dict[str, int]  # by rank
    resumed: dict[str, int]  # by kind: stream (continued), request (sent again)
    resume_gap: HistogramCounts
    no_rank: int
    rejected: dict[str, int]  # by status
    placed: dict[str, int]  # keyed policies: home, spilled
    ttfb: dict[str, HistogramCounts]  # by rank
    duration: dict[str, HistogramCounts]  # by rank
    inflight: dict[str, int]  # by rank
    cache: dict[str, Any]  # the cache policy's report (kvcache.CacheRouting.report), with its lookup times
    chunks: int  # pieces of answers relayed from the ranks
    loop_lag: float  # the most the worker's loop was late since its last report (seconds)


def stats_message(stats: StatsReport) -> bytes:
    return encode({"stats": stats})


def read_stats(message: Mapping[str, Any]) -> StatsReport | None:
    """A stats message's report; None for another message (its fields are read where summed, each
    with a default: a worker of another version may lack one)."""
    stats = message.get("stats")
    return cast(StatsReport, stats) if isinstance(stats, dict) else None


def load_message(version: int, inflight: Mapping[int, int], stalled: list[int]) -> bytes:
    return encode({"load": {"v": version, "inflight": {str(k): n for k, n in inflight.items() if n},
                            "stalled": stalled}})


@dataclasses.dataclass(frozen=True)
class Load:
    """A worker's `load` message: the view it routes by, what it holds per rank, which stall."""
    version: int
    inflight: dict[int, int]
    stalled: frozenset[int]


def read_load(message: Mapping[str, Any]) -> Load | None:
    load = message.get("load")
    if not isinstance(load, dict):
        return None
    try:
        return Load(int(load["v"]), {int(k): int(n) for k, n in load["inflight"].items()},
                    frozenset(int(r) for r in load.get("stalled", ())))
    except (TypeError, ValueError, KeyError, AttributeError):
        return None


def unreachable_message(rank: int, attempt: int, why: str) -> bytes:
    return encode({"unreachable": [rank, attempt, why]})


def stalled_message(rank: int, attempt: int, quiet_s: float, requests: int) -> bytes:
    return encode({"stalled": [rank, attempt, round(quiet_s, 3), requests]})


def resumed_message(from_rank: int, to_rank: int, tokens: int, gap_s: float) -> bytes:
    return encode({"resumed": [from_rank, to_rank, tokens, round(gap_s, 6)]})


@dataclasses.dataclass(frozen=True)
class Resumed:
    from_rank: int
    to_rank: int
    tokens: int
    gap_s: float


def read_resumed(message: Mapping[str, Any]) -> Resumed | None:
    try:
        from_rank, to_rank, tokens, gap = message["resumed"]
        return Resumed(int(from_rank), int(to_rank), int(tokens), float(gap))
    except (KeyError, TypeError, ValueError):
        return None


@dataclasses.dataclass(frozen=True)
class Unreachable:
    """A rank the worker could not connect to, though it was told the rank is ready."""
    rank: int
    attempt: int
    why: str


@dataclasses.dataclass(frozen=True)
class Stalled:
    """A ready rank that holds the worker's requests and has sent nothing back for `quiet_s`."""
    rank: int
    attempt: int
    quiet_s: float
    requests: int


def read_report(message: Mapping[str, Any]) -> Unreachable | Stalled | None:
    """An `unreachable` or `stalled` report; None for another message."""
    try:
        if "unreachable" in message:
            rank, attempt, why = message["unreachable"]
            return Unreachable(int(rank), int(attempt), str(why)[:WHY_CHARS])
        if "stalled" in message:
            rank, attempt, quiet, requests = message["stalled"]
            return Stalled(int(rank), int(attempt), float(quiet), int(requests))
    except (TypeError, ValueError):
        return None
    return None
