"""A resumable stream whose rank failed after it began (it died, was killed as hung, or was
handed off by a planned stop): the rest of its generation is asked of another ready rank
(resume.continuation) and read back in the original request's format (stream.py), as many times
as --router-retries allows. The client reads one uninterrupted stream.

Ends: the answer had finished before the cut (its end is written here, nothing regenerated); no
rank takes the continuation within --router-queue-timeout, or the retries run out (the stream ends
with an OpenAI-shaped error event and [DONE], as an uncontinued stream does); the client goes away
(the continuation's rank sees the disconnect and stops generating).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from vllm_dp_supervisor.router import resume
from vllm_dp_supervisor.router.client import ClientConnection, Request
from vllm_dp_supervisor.router.exchange import Exchange, Outcome
from vllm_dp_supervisor.router.routes import upstream_request

if TYPE_CHECKING:
    from vllm_dp_supervisor.router.proxy import Router

CONTINUATION_PATH = b"/v1/completions"


async def carry_on(router: Router, client: ClientConnection, request: Request, cut: Exchange) -> bool:
    """Continue the stream `cut` left; False when the client's connection must close."""
    stream, s = cut.stream, router.settings
    assert stream is not None
    failed = {(cut.rank, cut.attempt)}  # a rank that failed it may take it again once restarted
    last, cuts = cut, 0
    while True:
        cut_at = time.monotonic()
        if stream.done or stream.finish is not None:  # cut after its last token: finish, do not regenerate
            client.write(cut.frame(stream.end()) + (b"0\r\n\r\n" if cut.chunked else b""))
            return not cut.close_after
        body = None if stream.prompt_ids is None else resume.continuation(stream.plan, stream.prompt_ids,
                                                                           stream.generated)
        if body is None or cuts >= s.retries:
            return router.cut(client, last, last.rank)
        cuts += 1
        rank = await router.pick(router.still_failed(failed), cut_at + s.queue_timeout,
                                 placer=router.placer(CONTINUATION_PATH, body))
        if rank is None:
            last.why += "; no other rank ready to continue it"
            return router.cut(client, last, last.rank)
        stream.restart()
        data = upstream_request(request, client.peer, url=CONTINUATION_PATH, body=body)

        def going_on(when: float, cut_rank: int = last.rank, to: int = rank, tokens: int = len(stream.generated),
                     since: float = cut_at) -> None:
            """The continuation's first byte went out: the stream goes on."""
            router.stats.resumed["stream"] += 1
            if request.trace is not None:
                request.trace.resumes += 1
            router.stats.resume_gap.observe(when - since)
            router.report_resumed(cut_rank, to, tokens, when - since)
        outcome, exchange = await router.send(client, request, data, rank, stream, continuation=True,
                                              on_first_out=going_on)
        if outcome is Outcome.COMPLETE:
            return not cut.close_after
        if outcome is Outcome.CLIENT_GONE:
            return False
        failed.add((rank, exchange.attempt))
        exchange.why = exchange.why or f"the continuation was refused (HTTP {exchange.status})"
        last = exchange if exchange.first_out is not None else last

