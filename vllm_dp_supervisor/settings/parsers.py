"""Value parsers for the command line and the environment. Pure.

Each takes the text an operator typed and returns the value, or raises ValueError with a message
that completes "<flag>=<value>: ..." (a bare int()/float() failure becomes "must be a number").
"""

from __future__ import annotations

import enum
import math
import shlex
from collections.abc import Callable
from typing import Any

# --tee: which ranks' output goes to the console. None: all; (): none.
Tee = tuple[int, ...] | None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError("must be a port between 1 and 65535")
    return value


def port_or_none(text: str) -> int | None:
    """A port, or none/off for the thing it belongs to not to run."""
    if text.strip().lower() in ("none", "off"):
        return None
    return port(text)


def seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a positive number of seconds")
    return value


def seconds_or_off(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be 0 (off) or a positive number of seconds")
    return value


def load_bound(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 1:
        raise ValueError("must be a number of at least 1 (1: no rank above the mean)")
    return value


def weight(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a number of at least 0")
    return value


HEADER_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")


def header_name(text: str) -> str:
    """An HTTP header name (RFC 9110 token), lower case."""
    name = text.strip().lower()
    if not name or not set(name) <= HEADER_CHARS:
        raise ValueError("must be an HTTP header name (letters, digits, and !#$%&'*+-.^_`|~)")
    return name


def otlp_endpoint(text: str) -> str:
    """An OTLP collector's address: http(s)://host:port[/path], or host:port (gRPC)."""
    url = text.strip()
    scheme, sep, rest = url.partition("://")
    where = rest if sep else url
    if (sep and scheme not in ("http", "https")) or not where or any(c.isspace() for c in where) \
            or not where.split("/", 1)[0].rpartition(":")[2].isdigit():
        raise ValueError("must be http://HOST:PORT[/PATH], https://..., or HOST:PORT")
    if "@" in where.split("/", 1)[0]:
        raise ValueError("credentials go in OTEL_EXPORTER_OTLP_TRACES_HEADERS, not in the URL")
    return url


def host(text: str) -> str:
    if not text or any(c.isspace() for c in text):
        raise ValueError("must be a host name or address")
    return text


def command(text: str) -> tuple[str, ...]:
    try:
        argv = tuple(shlex.split(text))
    except ValueError as exc:  # unbalanced quotes
        raise ValueError(f"cannot be split like a shell would: {exc}") from None
    if not argv:
        raise ValueError("is empty")
    return argv


def devices(text: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in text.split(","))
    if not items or any(not item.isdigit() for item in items):
        raise ValueError("must be a comma-separated list of device indexes, e.g. 0,1,2,3")
    if len(set(items)) != len(items):
        raise ValueError("lists a device twice")
    return items


def choice(enum_type: type[enum.Enum]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return enum_type(text.strip().lower())
        except ValueError:
            raise ValueError("must be one of " + ", ".join(m.value for m in enum_type)) from None
    return parse


def size(text: str) -> int:
    """100000, 64K, 100M, 1G (binary multiples)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in "KMG" else ""
    value = int(t[:len(t) - len(unit)]) * units[unit]
    if value < 4096:
        raise ValueError("must be at least 4096 bytes")
    return value


def run_id(text: str) -> str:
    if not text or text in (".", "..") or "/" in text or "\0" in text:
        raise ValueError("must be a plain directory name")
    return text


def tee(text: str) -> Tee:
    t = text.strip().lower()
    if t == "all":
        return None
    if t == "none":
        return ()
    try:
        ranks = tuple(sorted({int(x) for x in t.split(",")}))
    except ValueError:
        raise ValueError("must be all, none, or a comma-separated list of ranks") from None
    if any(r < 0 for r in ranks):
        raise ValueError("ranks are 0 or more")
    return ranks


def exit_codes(text: str) -> frozenset[int]:
    if text.strip().lower() == "none":
        return frozenset()
    codes = frozenset(int(c) for c in text.split(","))
    if any(not 0 <= c <= 255 for c in codes):
        raise ValueError("exit codes are 0-255")
    return codes


def token(text: str) -> str:
    if not text.strip() or any(c.isspace() for c in text.strip()):
        raise ValueError("must be non-empty, without spaces")
    return text.strip()


def log_level(text: str) -> str:
    level = text.strip().lower()
    if level not in {"debug", "info", "warning", "error"}:
        raise ValueError("must be one of debug, info, warning, error")
    return level


