"""Every rank's own `vllm:*` series on the supervisor's /metrics, with a `rank` label added, so
one scrape of the pod sees all of it (vLLM serves them only on each rank's port).

Fetched at scrape time, concurrently, with the ranks' API key, from the ranks whose server
answers (ready, draining, stalled, recovering); a rank that does not answer within the timeout,
or answers badly, is left out of that scrape and counted in
`supervisor_rank_metrics_skipped_total{rank, reason}`. Nothing is cached: a series is as fresh as
the scrape. `merge` is pure and does the text work; nothing here writes rank state.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping, Sequence

from vllm_dp_supervisor.core.snapshot import Snapshots
from vllm_dp_supervisor.core.states import RankState
from vllm_dp_supervisor.server.client import Prober
from vllm_dp_supervisor.server.probes import METRICS_MAX_BYTES, ProbeResult

PREFIX = "vllm:"  # vLLM's series; a rank's python_* and process_* would clash with ours
ANSWERING = frozenset({RankState.READY, RankState.DRAINING, RankState.STALLED, RankState.RECOVERING})
# `name{labels} value` or `name value`: the name ends at the first '{' or blank.
_NAME = re.compile(r"^([^\s{]+)")


def merge(texts: Mapping[int, str]) -> str:
    """The `vllm:*` families of every rank's exposition (Prometheus text 0.0.4), each family once,
    with its HELP and TYPE, then the samples of every rank, each labelled rank="<i>"."""
    families: dict[str, list[str]] = {}  # family → its HELP and TYPE lines
    samples: dict[str, list[str]] = {}
    for rank, text in sorted(texts.items()):
        family = None
        for line in text.split("\n"):  # not splitlines(): a label value may hold \r or \u2028
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    if family.startswith(PREFIX):
                        head = families.setdefault(family, [])
                        if not any(h.split(None, 2)[1] == parts[1] for h in head):
                            head.append(line)
                continue
            match = _NAME.match(line)
            if match is None:
                continue
            name = match.group(1)
            owner = family if family is not None and name.startswith(family) else name
            if owner.startswith(PREFIX):
                families.setdefault(owner, [])
                samples.setdefault(owner, []).append(_with_rank(line, len(name), rank))
    out = []
    for family, head in families.items():
        out.extend(head)
        out.extend(samples.get(family, ()))
    return "".join(line + "\n" for line in out)


def _with_rank(line: str, name_end: int, rank: int) -> str:
    label = f'rank="{rank}"'
    rest = line[name_end:]
    if rest.startswith("{"):
        inner = rest[1:]
        return f"{line[:name_end]}{{{label}{'' if inner.lstrip().startswith('}') else ','}{inner}"
    return f"{line[:name_end]}{{{label}}}{rest}"


class RankMetrics:
    """The scrape-time fetch: `await collect()` → the merged text (bytes, possibly empty)."""

    def __init__(self, prober: Prober, snapshots: Snapshots, urls: Sequence[str], timeout: float,
                 on_skip: Callable[[int, str], None]) -> None:
        """`urls`: each rank's base URL, by rank (`RankSpec.url`)."""
        self._prober = prober
        self._snapshots = snapshots
        self._urls = list(urls)
        self._timeout = timeout
        self._on_skip = on_skip
        self._fetching: asyncio.Future[bytes] | None = None

    async def collect(self) -> bytes:
        """Scrapes that arrive while one is fetching share its answer: however often /metrics is
        asked (it is unauthenticated), the ranks are asked at most once at a time."""
        if self._fetching is None or self._fetching.done():
            self._fetching = asyncio.ensure_future(self._collect())
        return await asyncio.shield(self._fetching)  # one scraper that hangs up cancels no other

    async def _collect(self) -> bytes:
        ranks = [r.rank for r in self._snapshots.current.ranks if r.state in ANSWERING]
        answers = await asyncio.gather(*(self._fetch(rank) for rank in ranks))
        return merge({rank: text for rank, text in answers if text is not None}).encode()

    async def _fetch(self, rank: int) -> tuple[int, str | None]:
        result, text = await self._prober.get_text(f"{self._urls[rank]}/metrics", self._timeout, METRICS_MAX_BYTES)
        if text is None:
            self._on_skip(rank, _reason(result))
        return rank, text


def _reason(result: ProbeResult) -> str:
    if result.failure is None:
        return "too_large"
    return result.failure.value
