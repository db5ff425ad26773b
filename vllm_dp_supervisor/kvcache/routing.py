"""A router worker's knowledge of the ranks' caches: one feed per rank's current attempt (feed.py),
the model's prompt reader (prompts.py), what each candidate holds of a prompt (holdings.py). The
cache policy (router/policies/cache.py) asks `holdings` for each request and tells `placed` where
it went; on every view `follow` learns which attempt of each rank runs; the rest runs in tasks.

`holdings` answers None when a request cannot be placed by cache, and the policy places it by
load (least-requests) instead: the tokenizer is not loaded (yet: the model may still be downloading;
it is looked for again while it is missing), a candidate rank's events are not being read, or the
prompt is not one it reads as vLLM would. Each is counted by reason.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import zmq.asyncio

from vllm_dp_supervisor.kvcache import model_files
from vllm_dp_supervisor.kvcache.blocks import PromptBlocks
from vllm_dp_supervisor.kvcache.feed import Endpoints, FeedCounts, RankFeed
from vllm_dp_supervisor.kvcache.holdings import Holdings, held_runs
from vllm_dp_supervisor.kvcache.placements import MEMORY_BLOCK, Placements, depths
from vllm_dp_supervisor.kvcache.prompts import PromptError, PromptReader
from vllm_dp_supervisor.settings.config import ModelSource

LOAD_RETRY_S = 5.0  # while the tokenizer is missing, how often a view makes the worker look again
ROUTED_PATHS = ("/v1/chat/completions", "/v1/completions")

log = logging.getLogger("vllm_dp_supervisor.router")


class CacheRouting:
    def __init__(self, endpoints: Mapping[int, Endpoints], source: ModelSource | None, environ: Mapping[str, str],
                 limit: int = 1 << 22) -> None:
        self._endpoints = dict(endpoints)
        self._source, self._environ, self._limit = source, environ, limit
        self._context = zmq.asyncio.Context()
        self.feeds: dict[int, tuple[int, RankFeed]] = {}  # rank → (attempt, its feed)
        self.counts = {rank: FeedCounts() for rank in self._endpoints}
        self.reader: PromptReader | None = None
        self.fallbacks: collections.Counter[str] = collections.Counter()  # placed by load instead, by why
        self.predicted_hits: collections.Counter[int] = collections.Counter()  # rank → tokens it should hit
        self.routed: collections.Counter[int] = collections.Counter()  # rank → requests placed by cache
        self.placements = Placements()
        # rank → requests placed there because this worker sent their prefix there last, though the
        # rank's index held less of it (evicted, or its events not in yet)
        self.recalled: collections.Counter[int] = collections.Counter()
        # rank → what its engine said it hit of the requests placed by cache, against the
        # prediction (vLLM's --enable-prompt-tokens-details): requests checked, tokens credited
        # that it did not hit (a stale index: over), tokens it hit that were not (under)
        self.checks: dict[str, collections.Counter[int]] = {
            "checked": collections.Counter(), "over_credited": collections.Counter(),
            "over_credited_tokens": collections.Counter(), "under_credited_tokens": collections.Counter()}
        self._loading: asyncio.Task[None] | None = None
        self._tried_at = -LOAD_RETRY_S
        self._said: str | None = None

    # ---- the ranks' engines ----

    def follow(self, engines: Mapping[int, tuple[int, bool]]) -> None:
        """Each rank's current attempt and whether its engine runs and keeps its cache. A feed
        whose attempt ended is closed and its index goes with it; a new attempt gets a new one."""
        for rank, endpoints in self._endpoints.items():
            attempt, caching = engines.get(rank, (-1, False))
            have = self.feeds.get(rank)
            if have is not None and (not caching or have[0] != attempt):
                have[1].close()
                del self.feeds[rank]
                self.counts[rank].drops["engine ended"] += 1
            if caching and rank not in self.feeds:
                feed = RankFeed(self._context, endpoints, self.counts[rank], self._limit)
                feed.start()
                self.feeds[rank] = (attempt, feed)
        if self.reader is None and self._loading is None and time.monotonic() - self._tried_at >= LOAD_RETRY_S \
                and any(caching for _, caching in engines.values()):
            self._tried_at = time.monotonic()
            self._loading = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        try:
            if self._source is None:
                raise model_files.ModelFilesError("the ranks' arguments name no model")
            files = await asyncio.to_thread(model_files.find, self._source, self._environ)
            self.reader = await asyncio.to_thread(PromptReader, files)
            log.info("cache routing: the tokenizer and chat template of %s are loaded%s", files.directory,
                     "" if self.reader.in_pieces else " (prompts are tokenized whole)")
        except Exception as exc:  # any failure to load leaves the router routing by load
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if why != self._said:
                self._said = why
                log.warning("cache routing waits for the model's tokenizer (requests go by load until "
                            "then): %s", why)
        finally:
            self._loading = None

    def close(self) -> None:
        for _, feed in self.feeds.values():
            feed.close()
        self.feeds.clear()
        if self._loading is not None:
            self._loading.cancel()
        self._context.destroy(linger=0)

    # ---- a request ----

    def holdings(self, path: str, request: Mapping[str, Any] | None, candidates: Sequence[int]) -> Holdings | None:
        """What each candidate holds of this request's prompt (`request`: its body, parsed), or
        None: place it by load (the reason is counted)."""
        why = self._why_not(path, candidates)
        if why is None and request is not None and not self._base_model(request.get("model")):
            why = "not the base model"
        if why is None and request is not None and _skips_cache(path, request):
            why = "skips the prefix cache"
        if why is None:
            try:
                if request is None:
                    raise PromptError("not a JSON object")
                return self._holdings(self.reader.text(path, request), candidates)  # type: ignore[union-attr]
            except PromptError:
                why = "prompt not read"
        self.fallbacks[why] += 1
        return None

    def placed(self, rank: int, holdings: Holdings) -> None:
        """The policy sent the request to `rank`: the hit the router predicts there."""
        self.routed[rank] += 1
        self.predicted_hits[rank] += holdings.held.get(rank, 0) * holdings.block_size
        self.placements.remember(holdings.remembered, rank)
        if holdings.recalled is not None and holdings.recalled[0] == rank \
                and holdings.held.get(rank, 0) * holdings.block_size < holdings.recalled[1]:
            self.recalled[rank] += 1

    def reset(self, rank: int) -> None:
        """`rank`'s engine said it emptied its prefix cache: its index is emptied now. vLLM
        publishes the event (AllBlocksCleared) only with its next scheduler step, so without this
        the first request after a reset would be placed, and credited, by blocks gone."""
        if rank in self.feeds:
            self.feeds[rank][1].index.cleared()

    def checked(self, rank: int, predicted: int, cached: int) -> None:
        """`rank`'s engine hit `cached` tokens of a prompt the policy placed there predicting `predicted`."""
        self.checks["checked"][rank] += 1
        if predicted > cached:
            self.checks["over_credited"][rank] += 1
            self.checks["over_credited_tokens"][rank] += predicted - cached
        else:
            self.checks["under_credited_tokens"][rank] += cached - predicted

    def _base_model(self, model: object) -> bool:
        """Whether a request naming `model` is for the base model's blocks: a LoRA adapter's are
        keyed by the adapter too (vLLM's extra keys), so its prompt is placed by load."""
        names = self._source.names if self._source is not None else ()
        return not model or not names or model in names  # vLLM: no model, or "", is the base one

    def _why_not(self, path: str, candidates: Sequence[int]) -> str | None:
        if path not in ROUTED_PATHS:
            return "not a completion"
        if self.reader is None:
            return "no tokenizer"
        if any(r not in self.feeds or not self.feeds[r][1].trusted for r in candidates):
            return "events not read"
        return None

    def _holdings(self, prompt: tuple[str, bool] | list[int], candidates: Sequence[int]) -> Holdings:
        assert self.reader is not None
        indexes = {r: self.feeds[r][1].index for r in candidates}
        block_size = next((i.block_size for i in indexes.values() if i.block_size), None)
        # The memory's blocks first: they are known before any engine has said its block size
        # (placements.py), and they read the prompt far enough to estimate its length.
        memory = _Reading(self.reader, prompt, MEMORY_BLOCK)
        remembered = tuple((depth, key) for depth in depths()
                           if (key := memory.blocks.key(depth // MEMORY_BLOCK - 1)) is not None)
        memory.blocks.key(depths()[-1] // MEMORY_BLOCK)  # one block past them: whether the prompt ends there
        recalled = self.placements.recall(remembered)
        if recalled is not None and recalled[0] not in candidates:
            recalled = None  # remembered on a rank that is not a candidate now
        held, blocks, (tokens, whole) = dict.fromkeys(candidates, 0), 0.0, memory.length()
        if block_size is not None:
            reading = _Reading(self.reader, prompt, block_size)
            held = held_runs(reading.blocks, indexes)
            if reading.blocks.tokens > memory.blocks.tokens:  # read further: a better estimate
                tokens, whole = reading.length()
            blocks = tokens / block_size
            if whole:  # vLLM computes a prompt's last token even when all of it is cached
                held = {r: min(h, max(0, int(tokens) - 1) // block_size) for r, h in held.items()}
        return Holdings(held, blocks, {r: len(i) for r, i in indexes.items()}, block_size or 0, remembered, recalled,
                        tokens)

    def report(self) -> dict[str, object]:
        """What the worker's stats message carries of it (router/stats.py)."""
        ranks = {}
        for rank, counts in self.counts.items():
            feed = self.feeds.get(rank)
            ranks[str(rank)] = {"blocks": len(feed[1].index) if feed else 0,
                                "trusted": int(bool(feed and feed[1].trusted)),
                                "batches": counts.batches, "events": counts.events,
                                "unreadable": counts.unreadable, "gaps": counts.gaps, "repaired": counts.repaired,
                                "drops": dict(counts.drops), "skipped": counts.skipped,
                                "routed": self.routed[rank], "predicted_hit_tokens": self.predicted_hits[rank],
                                "recalled": self.recalled[rank],
                                **{name: counts[rank] for name, counts in self.checks.items()}}
        return {"ranks": ranks, "fallbacks": dict(self.fallbacks), "tokenizer": int(self.reader is not None)}


def _skips_cache(path: str, request: Mapping[str, Any]) -> bool:
    """Whether vLLM reads none of the prefix cache for this request: it asks for the prompt's
    logprobs (SamplingParams.prompt_logprobs), which a hit would leave short. `echo` sets them to
    a chat's top_logprobs (0 when absent or null) and to a completion's logprobs."""
    if request.get("prompt_logprobs") is not None:
        return True
    if not request.get("echo"):
        return False
    return path == "/v1/chat/completions" or request.get("logprobs") is not None


class _Reading:
    """A prompt's blocks of `size`, read as far as asked, and the characters of its text read."""

    def __init__(self, reader: PromptReader, prompt: tuple[str, bool] | list[int], size: int) -> None:
        self._prompt = prompt
        self.chars = [0, len(prompt[0]) if isinstance(prompt, tuple) else 0]  # read, in all
        self.blocks = PromptBlocks(_counting(reader.token_pieces(prompt), self.chars), size)

    def length(self) -> tuple[float, bool]:
        """The prompt's tokens (estimated past what was read, from the characters), and whether
        that is exact."""
        if isinstance(self._prompt, list):
            return len(self._prompt), True
        read, total = self.chars
        if self.blocks.ended and read >= total:  # a bounded read may end short of the text's end
            return self.blocks.tokens, True
        return self.blocks.tokens * total / max(1, read), False


def _counting(pieces: Iterator[tuple[Sequence[int], int]], chars: list[int]) -> Iterator[Sequence[int]]:
    for ids, covered in pieces:
        chars[0] += covered
        yield ids
