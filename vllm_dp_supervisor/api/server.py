"""The supervisor's own HTTP API: /live (/livez), /ready (/readyz, /health, /ready/<rank>), /status,
/metrics, /events, and the operator actions (POST /drain, /undrain, /stop, /rollout,
/ranks/<i>/restart), which exist only when an admin token is configured.

Served from the first moment, before any rank is ready: a probe must see a 503 that says why,
not a refused connection. Runs inside the supervisor's event loop and never installs signal
handlers: the supervisor owns the signals.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.routing import Route

from vllm_dp_supervisor.api.bounds import ACCEPT_BACKLOG, MAX_CONNECTIONS, GuardedHttpProtocol
from vllm_dp_supervisor.api.event_stream import EventStream, ascii_number
from vllm_dp_supervisor.api.metrics import CONTENT_TYPE
from vllm_dp_supervisor.core.events import EventLog
from vllm_dp_supervisor.core.records import RefusedAction
from vllm_dp_supervisor.core.snapshot import Snapshots

log = logging.getLogger("supervisor")
KEEP_ALIVE_S = 5  # seconds an idle kept-alive connection stays open
RANK_DIGITS = 5  # ranks are fewer than 65536 (one port each)


class PodSource(Protocol):
    """What the API reads (the published view, events) and the operator actions it may call:
    `core.machine.Machine`. It writes nothing else."""
    snapshots: Snapshots
    events: EventLog
    def drain(self) -> dict[str, Any]: ...
    def undrain(self) -> dict[str, Any]: ...
    def restart_rank(self, rank: int) -> dict[str, Any]: ...
    def operator_stop(self) -> dict[str, Any]: ...
    def begin_rollout(self) -> dict[str, Any]: ...


def build_app(source: PodSource, status: Callable[[bool], dict[str, Any]], metrics: Callable[[], Awaitable[bytes]],
              admin_token: str | None, rank_logs_public: bool = False) -> FastAPI:
    """`status(rank_logs)`: /status's body (status.py), with or without the ranks' log lines.
    `metrics()`: /metrics's body (the pod's series and every rank's). `admin_token`: what the
    operator actions require (None: they answer 404), and what a reader of the ranks' log lines
    on /status and /events sends, unless `rank_logs_public`."""
    app = FastAPI(title="vllm-dp-supervisor", docs_url=None, redoc_url=None, openapi_url=None)

    def may_read_rank_logs(authorization: str | None) -> bool:
        return rank_logs_public or _authorized(authorization, admin_token)

    # async routes: answered on the event loop itself, no thread pool hop.
    async def live() -> JSONResponse:
        if source.snapshots.current.live:
            return JSONResponse({"live": True})
        return JSONResponse({"live": False, "stopping": True}, status_code=503)

    for path in ("/live", "/livez"):
        app.add_api_route(path, live, methods=["GET", "HEAD"])

    async def ready() -> JSONResponse:
        view = source.snapshots.current
        if view.ready:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "stopping": not view.live,
                             "not_ready": view.not_ready()}, status_code=503)

    for path in ("/ready", "/readyz", "/health"):
        app.add_api_route(path, ready, methods=["GET", "HEAD"])

    @app.api_route("/ready/{rank}", methods=["GET", "HEAD"])
    async def rank_ready(rank: str) -> JSONResponse:
        """For a load balancer that targets each rank's port: take just that one out."""
        view = source.snapshots.current
        index = _rank_index(rank, len(view.ranks))
        if isinstance(index, JSONResponse):
            return index
        ok = view.rank_ready(index)
        return JSONResponse({"rank": index, "ready": ok}, status_code=200 if ok else 503)

    _add_admin_routes(app, source, admin_token)

    @app.get("/status")
    async def status_route(request: Request) -> JSONResponse:
        return JSONResponse(status(may_read_rank_logs(request.headers.get("authorization"))))

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(await metrics(), media_type=CONTENT_TYPE)

    # A plain ASGI endpoint (not a mount: a mount would redirect /events to /events/).
    app.router.routes.append(Route("/events", EventStream(source.events, may_read_rank_logs), methods=["GET"]))
    return app


def _rank_index(text: str, ranks: int) -> int | JSONResponse:
    index = ascii_number(text, RANK_DIGITS)
    if index is None:
        return JSONResponse({"error": f"rank must be a number from 0 to {ranks - 1}"}, status_code=400)
    if index >= ranks:
        return JSONResponse({"error": f"no rank {index}: ranks are 0-{ranks - 1}"}, status_code=404)
    return index


def _add_admin_routes(app: FastAPI, source: PodSource, token: str | None) -> None:
    """POST routes that change things, each one of the supervisor's operator actions. Without a
    configured token they do not exist (404)."""
    for path, action in (("/drain", "drain"), ("/undrain", "undrain"), ("/stop", "operator_stop"),
                         ("/rollout", "begin_rollout")):
        app.add_api_route(path, _action_route(source, action, token), methods=["POST"])

    @app.post("/ranks/{rank}/restart")
    async def restart(rank: str, request: Request) -> JSONResponse:
        denied = _denied(request, token)
        if denied is not None:
            return denied
        index = _rank_index(rank, len(source.snapshots.current.ranks))
        if isinstance(index, JSONResponse):
            return index
        return _act(lambda: source.restart_rank(index))


def _action_route(source: PodSource, action: str, token: str | None) -> Callable[..., Any]:
    async def route(request: Request) -> JSONResponse:
        return _denied(request, token) or _act(getattr(source, action))
    return route


def _denied(request: Request, token: str | None) -> JSONResponse | None:
    """None if the request carries the admin token, else the answer (404 when there is none)."""
    if token is None:
        return JSONResponse({"error": "not found"}, status_code=404)
    if not _authorized(request.headers.get("authorization"), token):
        return JSONResponse({"error": "a valid 'Authorization: Bearer <token>' is required"},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})
    return None


def _authorized(authorization: str | None, token: str | None) -> bool:
    """Does an Authorization header carry the admin token? Constant time, on bytes; the token
    itself is never logged or echoed."""
    if token is None or authorization is None:
        return False
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(errors="replace"), token.encode())


def _act(action: Callable[[], dict[str, Any]]) -> JSONResponse:
    try:
        return JSONResponse(action())
    except RefusedAction as exc:
        return JSONResponse({"error": str(exc)}, status_code=409)


class ApiServer(uvicorn.Server):
    """uvicorn on a socket we already bound, without uvicorn's signal handlers, with every
    connection bounded (see http_guard)."""

    def __init__(self, app: FastAPI, sock: socket.socket, max_connections: int = MAX_CONNECTIONS) -> None:
        protocol = type("ApiProtocol", (GuardedHttpProtocol,), {"max_connections": max_connections})
        super().__init__(uvicorn.Config(app, log_config=None, log_level="warning", access_log=False,
                                        lifespan="off", timeout_graceful_shutdown=1, http=protocol,
                                        timeout_keep_alive=KEEP_ALIVE_S, backlog=ACCEPT_BACKLOG))
        self._sock = sock

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def serve_socket(self) -> None:
        await self.serve(sockets=[self._sock])
