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

from vllm_dp_supervisor.api import probes
from vllm_dp_supervisor.api.bounds import ACCEPT_BACKLOG, MAX_CONNECTIONS, GuardedHttpProtocol
from vllm_dp_supervisor.api.event_stream import EventStream
from vllm_dp_supervisor.api.metrics import CONTENT_TYPE
from vllm_dp_supervisor.core.events import EventLog
from vllm_dp_supervisor.core.records import RefusedAction
from vllm_dp_supervisor.core.snapshot import PodView, Snapshots

log = logging.getLogger("supervisor")
KEEP_ALIVE_S = 5  # seconds an idle kept-alive connection stays open


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

    # async routes: answered on the event loop itself, no thread pool hop. A probe path usually
    # never gets here: the protocol answers it at once (bounds.py); a pipelined one does.
    def probe_route(path: bytes) -> Callable[[], Awaitable[JSONResponse]]:
        async def route() -> JSONResponse:
            return _probe_response(source.snapshots.current, path)
        return route

    for path in (*probes.LIVE_PATHS, *probes.READY_PATHS):
        app.add_api_route(path.decode(), probe_route(path), methods=["GET", "HEAD"])

    @app.api_route("/ready/{rank}", methods=["GET", "HEAD"])
    async def rank_ready(rank: str) -> JSONResponse:
        """For a load balancer that targets each rank's port: take just that one out."""
        return _probe_response(source.snapshots.current, probes.RANK_PREFIX + rank.encode())

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


def _probe_response(view: PodView, path: bytes) -> JSONResponse:
    found = probes.answer(view, path)
    if found is None:
        return JSONResponse({"error": "not found"}, status_code=404)
    return JSONResponse(found[1], status_code=found[0])


def _rank_index(text: str, ranks: int) -> int | JSONResponse:
    index = probes.rank_index(text, ranks)
    if isinstance(index, tuple):
        return JSONResponse(index[1], status_code=index[0])
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
    connection bounded and the probe paths answered at once (see bounds.py)."""

    def __init__(self, app: FastAPI, sock: socket.socket, snapshots: Snapshots,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        def at_once(path: bytes) -> tuple[int, bytes] | None:
            found = probes.answer(snapshots.current, path)
            return None if found is None else probes.encoded(found)
        protocol = type("ApiProtocol", (GuardedHttpProtocol,), {"max_connections": max_connections,
                                                                 "answer_at_once": staticmethod(at_once)})
        super().__init__(uvicorn.Config(app, log_config=None, log_level="warning", access_log=False,
                                        lifespan="off", timeout_graceful_shutdown=1, http=protocol,
                                        timeout_keep_alive=KEEP_ALIVE_S, backlog=ACCEPT_BACKLOG))
        self._sock = sock

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def serve_socket(self) -> None:
        await self.serve(sockets=[self._sock])
