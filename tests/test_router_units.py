"""The router's pure parts: balancing, endpoint families, the request as a rank gets it, and
the counters summed over workers. No process, no socket."""

from __future__ import annotations

import json
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from vllm_dp_supervisor.router.balance import Balancer, RouterPolicy
from vllm_dp_supervisor.router.client import Request
from vllm_dp_supervisor.router.collector import RouterStats
from vllm_dp_supervisor.router.proxy import upstream_request
from vllm_dp_supervisor.router.routes import error_response, family, resendable, sse_error_event
from vllm_dp_supervisor.router.stats import WorkerStats

RANKS = st.lists(st.integers(0, 15), min_size=0, max_size=16, unique=True)


@given(ready=RANKS, excluded=RANKS, inflight=st.dictionaries(st.integers(0, 15), st.integers(0, 50)),
       coin=st.floats(0, 0.999))
def test_least_requests_picks_a_least_loaded_rank_never_an_excluded_one(ready, excluded, inflight, coin):
    balancer = Balancer(RouterPolicy.LEAST_REQUESTS, rand=lambda: coin)
    balancer.inflight.update(inflight)
    choice = balancer.choose(ready, excluded)
    candidates = [r for r in ready if r not in excluded]
    if not candidates:
        assert choice is None
        return
    assert choice in candidates
    assert inflight.get(choice, 0) == min(inflight.get(r, 0) for r in candidates)


def test_least_requests_breaks_ties_at_random_and_follows_the_counts():
    draws = iter([0.0, 0.5, 0.99])
    balancer = Balancer(RouterPolicy.LEAST_REQUESTS, rand=lambda: next(draws))
    assert [balancer.choose([0, 1]) for _ in range(3)] == [0, 1, 1]
    balancer.started(0)
    balancer.started(0)
    balancer.started(1)
    assert balancer.choose([0, 1]) == 1
    balancer.finished(0)
    balancer.finished(0)
    assert balancer.choose([0, 1]) == 0


@given(ready=st.lists(st.integers(0, 7), min_size=1, max_size=8, unique=True))
def test_round_robin_gives_each_ready_rank_its_turn(ready):
    balancer = Balancer(RouterPolicy.ROUND_ROBIN)
    picks = Counter(balancer.choose(ready) for _ in range(len(ready) * 5))
    assert picks == dict.fromkeys(ready, 5)


def test_only_stateless_endpoints_may_be_sent_twice():
    for path in (b"/v1/completions", b"/v1/chat/completions", b"/v1/embeddings", b"/v1/rerank",
                 b"/score", b"/tokenize", b"/v1/chat/completions/"):
        assert resendable(path), path
    for path in (b"/v1/responses", b"/v1/load_lora_adapter", b"/v1/models", b"/reset_prefix_cache",
                 b"/v1/audio/transcriptions", b"/", b""):
        assert not resendable(path), path
    assert family(b"/v1/chat/completions") == "chat" and family(b"/nope") == "other"


def test_the_rank_gets_the_request_unchanged_but_for_hop_by_hop_headers():
    request = Request(b"POST", b"/v1/completions?x=1", b"/v1/completions", True, [
        (b"Host", b"pod:8080"), (b"Authorization", b"Bearer k"), (b"Connection", b"keep-alive, X-Hop"),
        (b"X-Hop", b"1"), (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers"), (b"Transfer-Encoding", b"chunked"),
        (b"X-Forwarded-For", b"10.0.0.1"), (b"Expect", b"100-continue"), (b"Content-Length", b"999"),
        (b"X-Custom", b"kept")], b'{"prompt": "hi"}', True, 0.0)
    head, _, body = upstream_request(request, b"10.0.0.9").partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/completions?x=1 HTTP/1.1"
    names = [line.split(b":")[0].lower() for line in lines[1:]]
    assert names == [b"host", b"authorization", b"x-custom", b"x-forwarded-for", b"content-length"]
    assert b"x-forwarded-for: 10.0.0.1, 10.0.0.9" in lines
    assert b"content-length: 16" in lines and body == b'{"prompt": "hi"}'


def test_errors_look_like_openais():
    head, _, body = error_response(503, "Service Unavailable", "no rank", "service_unavailable",
                                   retry_after=1).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in head
    assert json.loads(body) == {"error": {"message": "no rank", "type": "service_unavailable", "param": None,
                                          "code": 503}}
    first, second = sse_error_event("cut").split(b"\n\n")[:2]
    assert json.loads(first.removeprefix(b"data: "))["error"]["message"] == "cut"
    assert second == b"data: [DONE]"


def test_counters_summed_over_workers_never_go_backwards_when_one_restarts():
    a, b = WorkerStats(), WorkerStats()
    a.observe(0, 200, "chat", 0.001, 0.5)
    a.observe(1, 502, "chat", None, 0.01)
    b.observe(0, 200, "chat", 0.002, 0.7)
    a.retries["unreachable"] += 1
    stats = RouterStats()
    stats.report(0, json.loads(json.dumps(a.message({0: 2}))))
    stats.report(1, json.loads(json.dumps(b.message({0: 1, 1: 1}))))
    assert stats.inflight() == {0: 3, 1: 1}
    before = stats.totals()
    assert before["requests"][("0", "2xx", "chat")] == 2 and before["retries"] == {"unreachable": 1}
    stats.retire(0)  # worker 0 died: its counts stay, its in-flight requests go
    after = stats.totals()
    assert after["requests"] == before["requests"] and after["ttfb"] == before["ttfb"]
    assert stats.inflight() == {0: 1, 1: 1}
    stats.report(0, WorkerStats().message({}))  # its successor starts from zero
    assert stats.totals()["requests"] == before["requests"]
    text = "\n".join(str(m) for m in stats.collect())
    assert "supervisor_router_requests" in text and "supervisor_router_time_to_first_byte_seconds" in text
