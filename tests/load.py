"""Steady client load through the router, every request accounted for: the planned-restart
tests, the rollout tests and the soak (soak.py) use it.

Each client thread sends completions in turn, streamed or not, on a fresh connection, and files
each request under one outcome. A client retries a refused or reset connection that got no answer
(what Kubernetes clients and OpenAI SDKs do), and files that under `retried_connect`: it cost the
client nothing but a retry.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter

BODY = {"model": "standin-model", "prompt": "hi", "max_tokens": 8}
HARMLESS = ("ok", "retried_connect", "refused_at_stop")


def classify(status: int, body: bytes, stream: bool) -> str:
    """What one answer was: `ok`, `cut_stream` (an error event ended it: its rank died mid-answer),
    `http_NNN`, or `bad_stream` (an SSE answer that ended without its marker)."""
    if status != 200:
        return f"http_{status}"
    if not stream:
        return "ok" if json.loads(body).get("choices") else "bad_body"
    if error_event(body) is not None:
        return "cut_stream"
    return "ok" if body.rstrip().endswith(b"data: [DONE]") else "bad_stream"


def error_event(body: bytes) -> bytes | None:
    """The SSE event that ended a stream with an error (OpenAI's shape: an object with "error"),
    if any; not merely the word, which a model may well generate."""
    for event in body.split(b"\n\n"):
        data = event.strip().removeprefix(b"data: ")
        if data.startswith(b"{"):
            try:
                if "error" in json.loads(data):
                    return data
            except ValueError:
                continue
    return None


class Load:
    def __init__(self, port: int, clients: int = 4, *, stream_every: int = 2, connect_retries: int = 50,
                 body: dict | None = None, timeout: float = 60) -> None:
        self.port = port
        self.outcomes: Counter[str] = Counter()
        self.answered_by: Counter[str] = Counter()  # x-dp-rank of each answer
        self.errors: list[str] = []  # a line per request that failed, for the failure message
        self.failed: list[tuple[float, str, str]] = []  # (monotonic, outcome, detail) per failure
        self._stop = threading.Event()
        self._go = threading.Event()  # cleared: clients wait before their next request
        self._go.set()
        self._lock = threading.Lock()
        self._body = body or BODY
        self._timeout = timeout
        self._connect_retries = connect_retries
        self._stream_every = stream_every
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """No new request; wait for those under way (their outcome is filed)."""
        self._stop.set()
        for t in self._threads:
            t.join()

    def stopping(self) -> None:
        """No new request from here (the pod is going away); those under way finish."""
        self._stop.set()
        self._go.set()

    def pause(self) -> None:
        """No new request until `resume`; those under way finish."""
        self._go.clear()

    def resume(self) -> None:
        self._go.set()

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.outcomes.values())

    def count(self, outcome: str) -> int:
        with self._lock:
            return self.outcomes[outcome]

    def failures(self) -> Counter[str]:
        """Every outcome but ok, retried_connect and refused_at_stop (costs nothing but a retry)."""
        with self._lock:
            return Counter({k: n for k, n in self.outcomes.items() if k not in HARMLESS})

    def _file(self, outcome: str, rank: str | None = None, detail: str = "") -> None:
        with self._lock:
            self.outcomes[outcome] += 1
            if rank is not None:
                self.answered_by[rank] += 1
            if outcome not in HARMLESS:
                self.failed.append((time.monotonic(), outcome, detail[:300]))
                if len(self.errors) < 50:
                    self.errors.append(f"{time.strftime('%H:%M:%S')} {outcome} {detail}"[:300])

    def _client(self, index: int) -> None:
        n = 0
        while not self._stop.is_set():
            self._go.wait()
            if self._stop.is_set():
                return
            n += 1
            stream = self._stream_every > 0 and n % self._stream_every == 0
            self._one(stream)

    def _one(self, stream: bool) -> None:
        data = json.dumps({**self._body, "stream": stream}).encode()
        for _ in range(self._connect_retries + 1):
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self._timeout)
            try:
                try:
                    conn.request("POST", "/v1/completions", body=data,
                                 headers={"Content-Type": "application/json", "Connection": "close"})
                    response = conn.getresponse()
                except (ConnectionRefusedError, ConnectionResetError, http.client.RemoteDisconnected) as exc:
                    # Nothing came back: the request may be sent again (a refused connection never
                    # reached anyone), as Kubernetes clients and the OpenAI SDKs do.
                    if self._stop.is_set() and isinstance(exc, ConnectionRefusedError):
                        self._file("refused_at_stop", detail="the pod stopped taking connections")
                        return
                    self._file("retried_connect", detail=type(exc).__name__)
                    time.sleep(0.05)
                    continue
                try:
                    body = response.read()
                except (OSError, http.client.HTTPException) as exc:
                    self._file("cut_connection", detail=f"{type(exc).__name__} after status {response.status}")
                    return
                rank = response.getheader("x-dp-rank")
                outcome = classify(response.status, body, stream)
                said = error_event(body) if stream else None  # an SSE error event says why
                self._file(outcome, rank, (said or body[:200]).decode(errors="replace"))
                return
            except OSError as exc:
                self._file(f"error_{type(exc).__name__}", detail=str(exc))
                return
            finally:
                conn.close()
        self._file("gave_up_connecting")
