"""router/control.py: every control endpoint vLLM 0.32 serves (read from its own source in .venv)
is answered for every rank, refused, or known to read the same on every rank; the combination of
the ranks' answers; the refusal's message."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vllm_dp_supervisor.router import control
from vllm_dp_supervisor.router.routes import FAMILIES, routed_path

# One rank answers for the pod: what reads the same on every rank (what it is, not what it holds),
# and SageMaker's /invocations (an inference request by another name).
ONE_RANK = {(b"POST", b"/invocations"), (b"GET", b"/server_info"), (b"GET", b"/version"), (b"GET", b"/get_world_size"),
                      (b"GET", b"/weight_info"), (b"GET", b"/tokenizer_info"), (b"GET", b"/fault_tolerance/status"),
                      (b"GET", b"/health"), (b"GET", b"/ping"), (b"POST", b"/ping")}
CONTROL_DIRS = ("serve/dev", "serve/lora", "serve/profile", "serve/elastic_ep", "serve/fault_tolerance",
                "serve/instrumentator", "serve/sagemaker", "rl", "scale_out/token_in_token_out")
ROUTE = re.compile(r'(?:@router\.(get|post)\(\s*"([^"]+)"|add_api_route\(\s*"([^"]+)"[^)]*methods=\["(\w+)"\])')


def vllm_control_routes() -> set[tuple[bytes, bytes]]:
    vllm = pytest.importorskip("vllm")
    root = Path(vllm.__file__).parent / "entrypoints"
    found = set()
    for folder in CONTROL_DIRS:
        for source in (root / folder).rglob("*.py"):
            for method, path, added, added_method in ROUTE.findall(source.read_text()):
                found.add(((method or added_method).upper().encode(), (path or added).encode()))
    return found


def test_every_control_endpoint_of_vllm_is_answered_for_every_rank_refused_or_the_same_everywhere():
    routes = vllm_control_routes()
    assert (b"POST", b"/sleep") in routes and (b"POST", b"/v1/load_lora_adapter") in routes  # the reading works
    unplaced = sorted((m, p) for m, p in routes if control.kind(m, p) is None and (m, p) not in ONE_RANK
                      and p not in FAMILIES and not p.startswith(b"/inference/v1/generate"))
    assert unplaced == []
    stale = sorted(p for p in control.REFUSED if not any(p == path for _, path in routes))
    assert stale == [] and all(entry in routes for entry in control.FAN_OUT)


def test_kinds():
    assert control.kind(b"POST", b"/sleep") == "refused" and control.kind(b"POST", b"/sleep/") == "refused"
    assert control.kind(b"POST", b"/reset_prefix_cache") == "fan out"
    assert control.kind(b"GET", b"/reset_prefix_cache") is None  # vLLM answers it its 405
    assert control.kind(b"POST", b"/v1/completions") is None and control.kind(b"GET", b"/version") is None


def test_a_refusal_says_why_and_names_each_ready_rank_s_port():
    raw = control.refusal(b"POST", b"/sleep", {1: 8001, 0: 8000}, close=False)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 501 Not Implemented")
    error = json.loads(body)["error"]
    assert error["code"] == 501 and error["type"] == "not_implemented"
    assert "rank 0: port 8000, rank 1: port 8001" in error["message"] and "sleeping" in error["message"]


def test_the_same_answer_from_every_rank_is_that_answer_exactly():
    same = (200, b'{"success":true}')
    assert control.combine({0: same, 1: same}) == same
    assert control.combine({0: (200, b"")}) == (200, b"")


def test_different_answers_combine_what_combines_and_keep_each_rank_s():
    status, body = control.combine({0: (200, b'{"is_sleeping": true}'), 1: (200, b'{"is_sleeping": false}')})
    assert status == 200 and json.loads(body) == {"is_sleeping": True, "ranks": {
        "0": {"status": 200, "body": {"is_sleeping": True}}, "1": {"status": 200, "body": {"is_sleeping": False}}}}
    status, body = control.combine({0: (200, b'{"success": true}'), 1: (200, b'{"success": false}')})
    assert status == 200 and json.loads(body)["success"] is False
    status, body = control.combine({0: (200, b'{"server_load": 3}'), 1: (200, b'{"server_load": 4}')})
    assert json.loads(body)["server_load"] == 7


def test_a_rank_that_failed_or_did_not_answer_makes_it_a_502_that_says_which():
    status, body = control.combine({0: (200, b'{"success": true}'), 1: None})
    assert status == 502 and "success" not in json.loads(body)
    assert json.loads(body)["ranks"]["1"] == {"status": None, "error": "no answer"}
    status, body = control.combine({0: (200, b"{}"), 1: (500, b"Internal Server Error")})
    assert status == 502 and json.loads(body)["ranks"]["1"] == {"status": 500, "body": "Internal Server Error"}
    assert control.combine({0: (404, b'{"detail":"Not Found"}'), 1: (404, b'{"detail":"Not Found"}')})[0] == 404


def test_the_manual_states_what_the_table_says():
    manual = (Path(__file__).parents[3] / "docs" / "router.md").read_text()
    section = manual.split("**vLLM's control endpoints**", 1)[1].split("\n- **", 1)[0]
    assert all(f"`{path.decode()}`" in section for _, path in control.FAN_OUT)
    weights = {p for p, why in control.REFUSED.items() if why == control._WEIGHTS}
    assert all(f"`{p.decode()}`" in section for p in control.REFUSED if p not in weights)
    assert "`/update_weights`" in section and f"within {control.FAN_OUT_TIMEOUT_S:g} s" in section


def test_paths_are_read_as_vllm_routes_them():
    """uvicorn percent-decodes a path before vLLM routes it; a trailing slash would get a redirect."""
    assert control.kind(b"POST", b"/sl%65ep") == "refused" and control.kind(b"POST", b"/reset_prefix_cach%65/") == \
        "fan out"
    assert routed_path(b"/reset_prefix_cache/") == b"/reset_prefix_cache"


def test_kv_event_sources_merge_into_vllm_s_shape():
    a = (200, b'{"0": {"endpoint": "tcp://*:5557"}}')
    b = (200, b'{"0": {"endpoint": "tcp://*:5558"}}')
    status, body = control.sources({0: a, 1: b})  # independent servers: each its own DP rank 0
    assert status == 200 and json.loads(body) == {"0": {"endpoint": "tcp://*:5557"}, "1": {"endpoint": "tcp://*:5558"}}
    group = {0: (200, b'{"0": {"endpoint": "x"}}'), 1: (200, b'{"1": {"endpoint": "y"}}')}  # one DP group
    assert json.loads(control.sources(group)[1]) == {"0": {"endpoint": "x"}, "1": {"endpoint": "y"}}
    assert control.sources({0: a, 1: None})[0] == 502
