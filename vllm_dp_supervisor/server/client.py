"""HTTP probes of a rank: /health, classified the way an operator reads it, and the deep probe
(a one-token completion) that sees an engine hung behind a healthy /health.

Every request authenticates as a client of the ranks would (`Authorization: Bearer` with the key
the ranks were given: vLLM's --api-key guards /v1/*), so a pod with an API key is not taken for a
hung one. The key is never put into a result, a message or a log line.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from vllm_dp_supervisor.server.probes import METRICS_MAX_BYTES, ProbeFailure, ProbeResult, token_total


class Prober:
    """Probes share one session: one connection pool, kept-alive connections to each rank."""

    def __init__(self, api_key: str | None = None) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def __aenter__(self) -> Prober:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True),
            # A probe never follows a redirect or reads a cookie: it asks one server one thing.
            cookie_jar=aiohttp.DummyCookieJar(),
            headers=self._headers,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def probe(self, url: str, timeout: float, json_body: dict | None = None) -> ProbeResult:
        """GET `url` (POST `json_body` if given); ok on 200."""
        return (await self._ask(url, timeout, json_body, lambda data: None))[0]

    async def probe_json(self, url: str, timeout: float, json_body: dict | None = None) -> tuple[ProbeResult, Any]:
        """Like `probe`, with the JSON body of a 200 answer (None if it is not JSON)."""
        return await self._ask(url, timeout, json_body, _json)

    async def get_text(self, url: str, timeout: float, max_bytes: int) -> tuple[ProbeResult, str | None]:
        """The text of a 200 answer to a GET, None if there was none or it is over `max_bytes`."""
        return await self._ask(url, timeout, None, lambda data: data.decode(errors="replace"), max_bytes)

    async def _ask(self, url: str, timeout: float, json_body: dict | None, parse: Callable[[bytes], Any],
                   max_bytes: int = -1) -> tuple[ProbeResult, Any]:
        assert self._session is not None
        start = time.perf_counter()

        def result(failure: ProbeFailure | None, status: int | None = None, detail: str = "") -> ProbeResult:
            return ProbeResult(failure, status, (time.perf_counter() - start) * 1000, detail)

        try:
            async with self._session.request("GET" if json_body is None else "POST", url, json=json_body,
                                             timeout=aiohttp.ClientTimeout(total=timeout),
                                             allow_redirects=False) as response:
                data = await _read(response, max_bytes)
                if response.status == 200:
                    return result(None, 200), parse(data) if max_bytes < 0 or len(data) <= max_bytes else None
                return result(ProbeFailure.STATUS, response.status, f"HTTP {response.status}"), None
        except TimeoutError:
            return result(ProbeFailure.TIMEOUT, detail=f"no answer in {timeout:g} s"), None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, ConnectionRefusedError):
                return result(ProbeFailure.REFUSED, detail="connection refused"), None
            return result(ProbeFailure.ERROR, detail=str(exc.os_error or exc)), None
        except (aiohttp.ClientError, OSError) as exc:
            return result(ProbeFailure.ERROR, detail=type(exc).__name__), None

    async def get_json(self, url: str, timeout: float) -> Any:
        """The JSON body of a 200 answer, or None."""
        return (await self.probe_json(url, timeout))[1]

    async def post_json(self, url: str, body: dict, timeout: float) -> int | None:
        """The status of a POST, or None if there was no answer."""
        assert self._session is not None
        try:
            async with self._session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                await r.read()
                return r.status
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None

    async def model_name(self, base_url: str, timeout: float) -> tuple[str | None, ProbeResult]:
        """The first model a vLLM server serves (GET /v1/models), and how asking went."""
        result, body = await self.probe_json(f"{base_url}/v1/models", timeout)
        try:
            return str(body["data"][0]["id"]), result
        except (KeyError, IndexError, TypeError):
            if result.ok:
                result = dataclasses.replace(result, failure=ProbeFailure.ERROR,
                                             detail="GET /v1/models listed no model")
            return None, result

    async def token_count(self, base_url: str, timeout: float) -> float | None:
        """Prompt + generation tokens a vLLM server has processed (its Prometheus counters), or
        None if it does not say. Moving counters mean the engine is working."""
        text = (await self.get_text(f"{base_url}/metrics", timeout, METRICS_MAX_BYTES))[1]
        return None if text is None else token_total(text)


async def _read(response: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """The whole body, or (with `max_bytes` >= 0) its first `max_bytes` + 1 bytes: enough to tell
    it is too large without holding more. (`content.read(n)` alone returns the next chunk only.)"""
    if max_bytes < 0:
        return await response.read()
    data = b""
    while len(data) <= max_bytes:
        chunk = await response.content.read(max_bytes + 1 - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None
