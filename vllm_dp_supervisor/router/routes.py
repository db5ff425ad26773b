"""What a request is to the router: its endpoint family, whether it may be sent again after a
rank died under it, the OpenAI-shaped errors it answers itself, and the request as a rank gets it.
Pure."""

from __future__ import annotations

import http
import json
import re
import urllib.parse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm_dp_supervisor.router.client import Request

# Families of vLLM's endpoints, by path. Only these are stateless: sent twice, they answer the
# same and change nothing, so a request whose rank died before answering may go to another one.
FAMILIES = {
    b"/v1/chat/completions": "chat",
    b"/v1/completions": "completions",
    b"/v1/embeddings": "embeddings",
    b"/pooling": "embeddings",
    b"/classify": "embeddings",
    b"/score": "score",
    b"/v1/score": "score",
    b"/rerank": "score",
    b"/v1/rerank": "score",
    b"/v2/rerank": "score",
    b"/tokenize": "tokenize",
    b"/detokenize": "tokenize",
    b"/v1/models": "models",
    b"/health": "health",
}
RESENDABLE = frozenset({"chat", "completions", "embeddings", "score", "tokenize"})

# Headers that describe one connection, not the message (RFC 9110 7.6.1): never forwarded.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade"})


def family(path: bytes) -> str:
    """The endpoint family of a request path (no query string); "other" when not known."""
    return FAMILIES.get(path.rstrip(b"/") or b"/", "other")


GEN_AI_OPERATIONS = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}
_BY_RESPONSE_ID = re.compile(rb"/v1/responses/[^/]+(/cancel)?")


def routed_path(path: bytes) -> bytes:
    """The path as vLLM routes it: percent-decoded (uvicorn decodes it before routing), without a
    trailing slash. Read for every request: a path without '%' is not decoded."""
    if b"%" in path:
        path = urllib.parse.unquote_to_bytes(path)
    return path.rstrip(b"/") or b"/"


def reason(status: int) -> bytes:
    """The status line's reason phrase."""
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def route(path: bytes, known: frozenset[bytes] = frozenset()) -> str | None:
    """A path's route, low in cardinality (a span's name, OpenTelemetry's http.route): a path vLLM
    serves as it is, or a template; None for any other path (its name would be unbounded).
    `known`: more exact paths (the control endpoints)."""
    path = routed_path(path)
    if path in FAMILIES or path in known or path in (b"/v1/responses", b"/metrics"):
        return path.decode()
    if (found := _BY_RESPONSE_ID.fullmatch(path)) is not None:
        return "/v1/responses/{response_id}" + ("/cancel" if found[1] else "")
    return None


def resendable(path: bytes) -> bool:
    return family(path) in RESENDABLE


def body_json(body: bytes) -> dict[str, Any] | None:
    """A request's body as a JSON object; None when it is not one (the rank answers it)."""
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


def error_body(message: str, kind: str, code: int) -> bytes:
    """OpenAI's error JSON, as vLLM answers it."""
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


def error_response(status: int, reason: str, message: str, kind: str, *, close: bool = False,
                   retry_after: int | None = None) -> bytes:
    body = error_body(message, kind, status)
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json",
            f"content-length: {len(body)}"]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    if close:
        head.append("connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def sse_error_event(message: str) -> bytes:
    """What ends a stream whose rank died mid-way: an error event in OpenAI's shape, then the end
    marker OpenAI clients stop on."""
    return b"data: " + error_body(message, "server_error", 502) + b"\n\ndata: [DONE]\n\n"


def upstream_request(request: Request, client_ip: bytes, *, url: bytes | None = None,
                     body: bytes | None = None) -> bytes:
    """The request as the rank gets it: unchanged but for hop-by-hop headers, with its body's
    length and the client's address in X-Forwarded-For. `url`, `body`: another target and body
    (a resumable stream's, a continuation's), with the same headers."""
    url = request.url if url is None else url
    body = request.body if body is None else body
    drop = set(HOP_BY_HOP) | {b"content-length", b"expect", b"x-forwarded-for"}
    forwarded = []
    for name, value in request.headers:
        lname = name.lower()
        if lname == b"connection":  # it may name more headers that are for this hop only
            drop.update(t.strip().lower() for t in value.split(b","))
        elif lname == b"x-forwarded-for":
            forwarded.append(value)
    lines = [request.method + b" " + url + b" HTTP/1.1"]
    lines += [name + b": " + value for name, value in request.headers if name.lower() not in drop]
    lines.append(b"x-forwarded-for: " + b", ".join([*forwarded, client_ip]))
    if body or request.method in (b"POST", b"PUT", b"PATCH"):
        lines.append(b"content-length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


TRACE_HEADERS = (b"traceparent", b"tracestate")


def with_trace(data: bytes, lines: bytes) -> bytes:
    """`data` (an upstream_request) with its trace context headers replaced by `lines` (whole
    header lines, CRLF-ended): the rank's spans go under the router's."""
    head, sep, body = data.partition(b"\r\n\r\n")
    first, *headers = head.split(b"\r\n")
    kept = [h for h in headers if h.split(b":", 1)[0].strip().lower() not in TRACE_HEADERS]
    return b"\r\n".join([first, *kept]) + b"\r\n" + lines + b"\r\n" + body if sep else data
