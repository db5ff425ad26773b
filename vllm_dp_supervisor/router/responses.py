"""The Responses API's stored responses, found on the rank that holds them. vLLM keeps a stored
response in the process that made it (VLLM_ENABLE_RESPONSES_API_STORE), so a follow-up
(`previous_response_id`), a retrieval (`GET /v1/responses/{id}`) and a cancel (`POST
/v1/responses/{id}/cancel`) answer only on that rank: sent to another, they 404.

The router learns nothing from answers: it asks. Before routing a request that names a stored
response, it asks every ready rank `GET /v1/responses/{id}` (its status only: the body is not
read) and sends the request to the rank that answers 200; what it found is kept per worker (LRU,
`KEPT` ids, by rank and attempt: a restarted rank holds nothing of its last attempt). Asking works
from any worker, after a worker restarts, and for a response made before the router saw it. When
no rank holds it (the store is off, the rank restarted, the id is wrong), the request goes by the
policy and the rank answers vLLM's own 404. A request naming a response is never sent again to
another rank (it is not stateless: routes.RESENDABLE).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import re
from typing import TYPE_CHECKING

from vllm_dp_supervisor.router.routes import routed_path, upstream_request

if TYPE_CHECKING:
    from vllm_dp_supervisor.router.client import Request
    from vllm_dp_supervisor.router.proxy import Router

RESPONSES = b"/v1/responses"
_BY_ID = re.compile(rb"/v1/responses/([^/?#]+)(?:/cancel)?/?")
_SAFE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,256}")  # what is asked of a rank in a path: nothing to escape
KEPT = 65536
ASK_TIMEOUT_S = 5.0


def named(request: Request) -> str | None:
    """The stored response a request names, or None."""
    path = routed_path(request.path)  # as vLLM routes it: uvicorn decodes it first
    if not path.startswith(RESPONSES):
        return None  # every request asks: the common answer first
    if (found := _BY_ID.fullmatch(path)) is not None:
        rid = found[1].decode(errors="replace")
    elif request.method == b"POST" and path.rstrip(b"/") == RESPONSES and \
            b"previous_response_id" in request.body:
        body = request.json()
        rid = body.get("previous_response_id") if body is not None else None
    else:
        return None
    return rid if isinstance(rid, str) and _SAFE_ID.fullmatch(rid) else None


class Holders:
    """Where this worker found each stored response: id → (rank, attempt), least recently used out."""

    def __init__(self, kept: int = KEPT) -> None:
        self._kept = kept
        self._where: collections.OrderedDict[str, tuple[int, int]] = collections.OrderedDict()

    def get(self, rid: str, ready: dict[int, tuple[int, int]]) -> int | None:
        where = self._where.get(rid)
        if where is None or ready.get(where[0], (0, -1))[1] != where[1]:
            return None  # not found yet, or its rank restarted since
        self._where.move_to_end(rid)
        return where[0]

    def put(self, rid: str, rank: int, attempt: int) -> None:
        self._where[rid] = (rank, attempt)
        self._where.move_to_end(rid)
        while len(self._where) > self._kept:
            self._where.popitem(last=False)


async def holder(router: Router, request: Request, rid: str, peer: bytes) -> int | None:
    """The ready rank that holds `rid`, asked of every ready rank unless known; None if none does."""
    known = router.holders.get(rid, router.ready)
    if known is not None:
        return known
    ranks = dict(router.ready)
    url = RESPONSES + b"/" + rid.encode()
    ask = upstream_request(dataclasses.replace(request, method=b"GET", url=url, path=url, body=b""), peer)
    answers = await asyncio.gather(*(router.ask(r, ask, ASK_TIMEOUT_S, status_only=True) for r in ranks))
    for rank, answer in zip(ranks, answers, strict=True):
        if answer is not None and answer[0] == 200:
            router.holders.put(rid, rank, ranks[rank][1])
            return rank
    return None
