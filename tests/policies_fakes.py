"""Requests as the router's policies read them, without a connection (router/policies/base.Routed)."""

from __future__ import annotations

from vllm_dp_supervisor.router.client import Request


def routed(body: bytes = b"", path: bytes = b"/v1/completions", method: bytes = b"POST",
           headers: list[tuple[bytes, bytes]] | None = None) -> Request:
    """A request as a client's connection hands it to the router."""
    return Request(method, path, path, True, headers or [], body, True, 0.0)
