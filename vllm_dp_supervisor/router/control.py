"""vLLM's control endpoints through the pod's OpenAI port. Sent to one rank like a completion,
each would act on one engine of several: `POST /sleep` would put one rank to sleep while the router
kept sending it requests, a LoRA adapter loaded at runtime would exist on one rank (and `/v1/models`
would differ by rank), a profile would cover one engine. So each is, by path:

- **answered for every rank** (`FAN_OUT`): sent to every ready rank, with the client's headers, and
  answered once: the ranks' own answer when they all gave the same one (so one rank reads exactly
  as vLLM), else a JSON object with the combined value of the keys that combine (`success`: all;
  `is_sleeping`, `is_paused`: any; `server_load`: the sum) and each rank's answer under `ranks`,
  with the status they share, or 502 when they differ. Only endpoints whose effect the router
  need not know: resetting caches, profiling, reading per-engine state;
- **refused** (`REFUSED`): 501, naming each ready rank's own port, for what changes an engine's
  state in a way the router would have to honour and does not (sleep, pause, weights, adapters,
  RPCs, scaling). Everything else goes to one rank as before (`/version`, `/server_info`, ...:
  the same on every rank).

The table and the combination are pure; `answer` sends the requests (the router's side requests).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from vllm_dp_supervisor.router.routes import body_json, error_response, reason, routed_path, upstream_request

if TYPE_CHECKING:
    from vllm_dp_supervisor.router.client import ClientConnection, Request
    from vllm_dp_supervisor.router.proxy import Router

FAN_OUT = frozenset({
    (b"POST", b"/reset_prefix_cache"), (b"POST", b"/reset_mm_cache"), (b"POST", b"/reset_encoder_cache"),
    (b"POST", b"/start_profile"), (b"POST", b"/stop_profile"),
    (b"GET", b"/is_sleeping"), (b"GET", b"/is_paused"), (b"GET", b"/load"), (b"GET", b"/kv_event_sources"),
})
_SLEEP = "it sleeps or wakes one engine, and the router would keep sending requests to a sleeping one"
_PAUSE = "it pauses or resumes one engine's scheduling, and the router would keep sending it requests"
_WEIGHTS = "it changes one engine's weights: the ranks would answer the same prompt differently"
_LORA = ("an adapter loaded at runtime would exist on the ranks it reached only (requests naming it would "
         "fail on the others, and on a rank that restarts); name adapters at start with --lora-modules")
REFUSED: Mapping[bytes, str] = {
    b"/sleep": _SLEEP, b"/wake_up": _SLEEP, b"/release_kv_cache_memory": _SLEEP,
    b"/pause": _PAUSE, b"/resume": _PAUSE,
    b"/abort_requests": "the requests it names run on one rank the router would have to find",
    b"/inference/v1/abort_requests": "the requests it names run on one rank the router would have to find",
    b"/collective_rpc": "it runs a call in one engine's workers",
    b"/v1/load_lora_adapter": _LORA, b"/v1/unload_lora_adapter": _LORA,
    b"/update_weights": _WEIGHTS, b"/init_weight_transfer_engine": _WEIGHTS,
    b"/shutdown_weight_transfer_engine": _WEIGHTS, b"/start_weight_update": _WEIGHTS,
    b"/start_draft_weight_update": _WEIGHTS, b"/finish_weight_update": _WEIGHTS,
    b"/update_weight_version": _WEIGHTS, b"/weight_checker": _WEIGHTS,
    b"/scale_elastic_ep": "it rescales one engine's expert parallelism",
    b"/is_scaling_elastic_ep": "it reads one engine's rescaling",
    b"/fault_tolerance/apply": "the supervisor orchestrates vLLM's fault tolerance itself (--enable-fault-tolerance)",
}
PATHS = frozenset({path for _, path in FAN_OUT} | set(REFUSED))  # exact paths: routes of their own
COMBINED: Mapping[str, Callable[[list[Any]], Any]] = {"success": all, "is_sleeping": any, "is_paused": any,
                                                      "server_load": sum}
FAN_OUT_TIMEOUT_S = 120.0  # a profile's stop writes its trace before it answers


def kind(method: bytes, path: bytes) -> str | None:
    """"fan out", "refused", or None: an ordinary request."""
    path = routed_path(path)
    if (method, path) in FAN_OUT:
        return "fan out"
    return "refused" if path in REFUSED else None


def refusal(method: bytes, path: bytes, ports: Mapping[int, int], *, close: bool) -> bytes:
    """The 501 for a refused endpoint: why, and where to send it instead (the ready ranks' ports)."""
    path = routed_path(path)
    where = ", ".join(f"rank {r}: port {p}" for r, p in sorted(ports.items())) or "none is ready now"
    message = (f"{method.decode(errors='replace')} {path.decode(errors='replace')} is not served on the pod's "
               f"port: {REFUSED[path]}. Send it to each rank's own port ({where}).")
    return error_response(501, "Not Implemented", message, "not_implemented", close=close)


def combine(answers: Mapping[int, tuple[int, bytes] | None]) -> tuple[int, bytes]:
    """One answer (status, JSON body) from each rank's (None: it did not answer)."""
    got = [a for a in answers.values() if a is not None]
    if got and len(got) == len(answers) and all(a == got[0] for a in got):
        return got[0]
    statuses = {a[0] for a in got}
    status = statuses.pop() if len(statuses) == 1 and len(got) == len(answers) else 502
    ranks = {str(r): _readable(a) for r, a in sorted(answers.items())}
    out: dict[str, Any] = {}
    objects = [o for a in got if (o := body_json(a[1])) is not None]
    if objects and len(objects) == len(answers):
        for key, how in COMBINED.items():
            if all(key in o for o in objects):
                out[key] = how([o[key] for o in objects])
    out["ranks"] = ranks
    return status, json.dumps(out).encode()


def sources(answers: Mapping[int, tuple[int, bytes] | None]) -> tuple[int, bytes]:
    """GET /kv_event_sources: vLLM's answer is each engine's KV-event publisher config keyed by
    its DP rank. The ranks' answers merged into one of that shape: keyed by DP rank when they
    differ (a DP group's ranks), else (independent servers, each its own DP rank 0) by the pod's
    rank; combined as any other answer when one is not a 200 with a JSON object."""
    got = {r: o for r, a in answers.items() if a is not None and a[0] == 200 and (o := body_json(a[1])) is not None}
    if len(got) != len(answers):
        return combine(answers)
    keys = [k for answer in got.values() for k in answer]
    if len(keys) == len(set(keys)):
        return 200, json.dumps({k: v for answer in got.values() for k, v in answer.items()}).encode()
    return 200, json.dumps({str(r): next(iter(a.values())) if len(a) == 1 else a for r, a in got.items()}).encode()


def _json(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def _readable(answer: tuple[int, bytes] | None) -> dict[str, Any]:
    if answer is None:
        return {"status": None, "error": "no answer"}
    try:
        body: Any = json.loads(answer[1]) if answer[1] else None
    except ValueError:
        body = answer[1].decode(errors="replace")[:1000]
    return {"status": answer[0], "body": body}


async def answer(router: Router, client: ClientConnection, request: Request) -> bool:
    """Answer a FAN_OUT request from every ready rank; False when the connection must close."""
    ranks = sorted(router.ready)
    path = routed_path(request.path)  # as vLLM routes it: a trailing slash would get each rank's redirect
    query = request.url.partition(b"?")[2]
    url = path + (b"?" + query if query else b"")
    data = upstream_request(dataclasses.replace(request, url=url, path=path), client.peer)
    close = client.closing or not request.keep_alive
    if not ranks:
        client.write(error_response(503, "Service Unavailable", "no model server is ready; retry later",
                                    "service_unavailable", retry_after=1, close=close))
        return not close
    answers = await asyncio.gather(*(router.ask(r, data, FAN_OUT_TIMEOUT_S) for r in ranks))
    if path == b"/reset_prefix_cache":
        for rank, got in zip(ranks, answers, strict=True):
            if got is not None and got[0] == 200 and (body_json(got[1]) or {}).get("success") is True:
                router.policy.cache_reset(rank)  # vLLM's event of it comes with its next step only
    by_rank = dict(zip(ranks, answers, strict=True))
    status, body = sources(by_rank) if path == b"/kv_event_sources" else combine(by_rank)
    head = [b"HTTP/1.1 %d %s" % (status, reason(status)), b"content-length: %d" % len(body),
            b"x-dp-ranks: " + ",".join(map(str, ranks)).encode()]
    if body:
        head.append(b"content-type: " + (b"application/json" if _json(body) else b"text/plain; charset=utf-8"))
    if close:
        head.append(b"connection: close")
    client.write(b"\r\n".join(head) + b"\r\n\r\n" + (b"" if request.method == b"HEAD" else body))
    return not close
