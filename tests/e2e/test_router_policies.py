"""The prefix and session policies end to end, over stand-in ranks: the same prompt start or the
same session lands on the same rank, different ones spread, and the placements are counted."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

from harness import metrics, request, wait_for

SYSTEMS = [f"You are assistant number {i}. " * 60 for i in range(12)]  # ~1,800 characters each


def chat(run, system: str, question: str, headers: dict | None = None, **extra) -> str:
    body = json.dumps({"model": "standin-model", "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": question}], **extra}).encode()
    status, answer_headers, _ = request(run, "POST", "/v1/chat/completions", body,
                                        {"Content-Type": "application/json", **(headers or {})})
    assert status == 200
    return answer_headers["x-dp-rank"]


def test_prefix_policy_keeps_each_system_prompt_on_one_rank_and_spreads_them(start):
    run = start(3, options=["--router-policy", "prefix"])
    run.wait_ready()
    seen: dict[int, set[str]] = defaultdict(set)
    for question in range(5):
        for i, system in enumerate(SYSTEMS):
            seen[i].add(chat(run, system, f"question {question}"))
    assert all(len(ranks) == 1 for ranks in seen.values()), seen  # one rank per prompt start
    assert len({next(iter(r)) for r in seen.values()}) == 3  # twelve prompts over all three ranks
    # A prefix shorter than --router-prefix-chars does not pin: these differ in their first 1,024
    spread = Counter(chat(run, "Be brief.", f"question {i}") for i in range(30))
    assert len(spread) >= 2
    wait_for(lambda: metrics(run).get(("supervisor_router_affinity_placements_total", (("outcome", "home"),)),
                                      0) >= 90, 5, "the placements to be counted")


def test_session_policy_pins_by_header_or_user_field(start):
    run = start(3, options=["--router-policy", "session", "--router-session-header", "X-Conversation"])
    run.wait_ready()
    by_header = {chat(run, "s", f"q{i}", {"X-Conversation": "c-42"}) for i in range(15)}
    by_user = {chat(run, "s", f"q{i}", user="alice") for i in range(15)}
    assert len(by_header) == 1 and len(by_user) == 1
    sessions = Counter(chat(run, "s", "q", {"X-Conversation": f"c-{i}"}) for i in range(60))
    assert len(sessions) == 3
