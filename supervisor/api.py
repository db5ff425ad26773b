"""The supervisor's own HTTP API: /live, /ready (/readyz, /health) and /status.

Served from the first moment, before any rank is ready: a probe must see a 503 that says why,
not a refused connection. Runs inside the supervisor's event loop and never installs signal
handlers: the supervisor owns the signals.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any, Protocol

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse


class StatusSource(Protocol):
    @property
    def ready(self) -> bool: ...
    @property
    def live(self) -> bool: ...
    def not_ready(self) -> list[dict[str, Any]]: ...
    def status(self) -> dict[str, Any]: ...


def build_app(source: StatusSource) -> FastAPI:
    app = FastAPI(title="vllm-dp-supervisor", docs_url=None, redoc_url=None, openapi_url=None)

    # async routes: answered on the event loop itself, no thread pool hop.
    @app.api_route("/live", methods=["GET", "HEAD"])
    async def live() -> JSONResponse:
        if source.live:
            return JSONResponse({"live": True})
        return JSONResponse({"live": False, "stopping": True}, status_code=503)

    async def ready() -> JSONResponse:
        if source.ready:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "stopping": not source.live,
                             "not_ready": source.not_ready()}, status_code=503)

    for path in ("/ready", "/readyz", "/health"):
        app.add_api_route(path, ready, methods=["GET", "HEAD"])

    @app.get("/status")
    async def status() -> JSONResponse:
        return JSONResponse(source.status())

    return app


class ApiServer(uvicorn.Server):
    """uvicorn on a socket we already bound, without uvicorn's signal handlers."""

    def __init__(self, app: FastAPI, sock: socket.socket) -> None:
        super().__init__(uvicorn.Config(app, log_config=None, log_level="warning", access_log=False,
                                        lifespan="off", timeout_graceful_shutdown=1))
        self._sock = sock

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def serve_socket(self) -> None:
        await self.serve(sockets=[self._sock])
