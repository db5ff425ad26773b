"""Streams that outlive their rank, end to end: the real CLI over stand-in ranks whose deterministic
model (tests/standin_model.py) answers the same on every rank, so a stream cut by a rank's death
and continued elsewhere must read byte for byte as an uninterrupted one."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading

import openai
import pytest
from harness import FAST, get_raw, metrics, post, request, standin_metric, wait_for

CHAT = {"model": "standin-model", "messages": [{"role": "user", "content": "Tell me a story."}], "stream": True}
COMPLETION = {"model": "standin-model", "prompt": "Once upon a time", "stream": True, "max_tokens": 40}
LONG = ("--standin-stream-chunks", "30", "--standin-stream-delay", "0.01")
RANK0_DIES = ("--standin-ranks", "0", "--standin-die-mid-stream", "6")


def read_sse(port: int, path: str, body: dict) -> dict:
    """A streamed answer as a client reads it: text, token ids, finish reason, usage, the events."""
    status, headers, data = request_on(port, path, body)
    assert status == 200, data
    events = [e.removeprefix(b"data: ") for e in data.strip().split(b"\n\n")]
    assert events[-1] == b"[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    text, ids, finish, usage = "", [], None, None
    for chunk in chunks:
        assert "error" not in chunk, chunk
        usage = chunk.get("usage", usage)
        for choice in chunk["choices"]:
            text += (choice["delta"].get("content") or "") if "delta" in choice else choice["text"]
            ids += choice.get("token_ids") or []
            finish = choice.get("finish_reason") or finish
    assert len({(c["id"], c["object"], c["model"]) for c in chunks}) == 1  # one answer, one id
    return {"text": text, "ids": ids, "finish": finish, "usage": usage, "rank": headers.get("x-dp-rank")}


def request_on(port: int, path: str, body: dict) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def uninterrupted(run, path: str, body: dict) -> dict:
    """The same request straight to rank 1, which never dies."""
    return read_sse(run.status()["ranks"][1]["port"], path, body)


def next_turn_to_rank_0(run) -> None:
    """Round-robin over two ranks starts on rank 1: one request through the router to rank 1."""
    assert request(run, "POST", "/v1/completions", json.dumps({"prompt": "x"}).encode())[1]["x-dp-rank"] == "1"


def resumed_on(run) -> int:
    return int(metrics(run).get(("supervisor_router_resumed_total", (("kind", "stream"),)), 0))


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", CHAT),
    ("/v1/completions", COMPLETION),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}, "return_token_ids": True}),
    ("/v1/completions", {**COMPLETION, "stop": ["zz"], "min_tokens": 2}),
], ids=["chat", "completion", "chat-usage-ids", "completion-stop"])
def test_a_stream_cut_by_its_ranks_death_continues_on_another_and_reads_whole(start, path, body):
    run = start(2, *LONG, *RANK0_DIES, options=[*FAST, "--router-policy", "round-robin", "--max-restarts", "100"])
    run.wait_ready()
    expected = uninterrupted(run, path, body)
    for _ in range(2):  # round-robin: one of the two lands on rank 0, which dies after 6 tokens
        wait_for(lambda: run.all_ready(), 20, "both ranks ready")
        got = read_sse(run.router_port, path, body)
        assert got == {**expected, "rank": got["rank"]}
    wait_for(lambda: resumed_on(run) == 1, 10, "the continuation to be counted")
    events = [e for e in run.events() if e["kind"] == "resumed"]
    assert len(events) == 1 and events[0]["rank"] == 0 and events[0]["to_rank"] == 1 and events[0]["tokens"] == 6
    assert "supervisor_router_resume_gap_seconds_count 1.0" in get_raw(run.supervisor_port, "/metrics")[1].decode()


@pytest.mark.parametrize(("path", "body"), [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)],
                         ids=["chat", "completion"])
@pytest.mark.parametrize("ending", ["--standin-abort-mid-stream", "--standin-done-mid-stream"],
                         ids=["finish-abort", "done-without-finish"])
def test_a_stream_its_rank_ends_without_finishing_continues_on_another_and_reads_whole(start, path, body, ending):
    """Seen with real vLLM, an EngineCore SIGKILLed under a stream: its server ended the stream
    with finish_reason "abort" and [DONE], or with [DONE] alone, no error event either way; the
    client once read that truncated answer as whole."""
    run = start(2, *LONG, "--standin-ranks", "0", ending, "6", options=[*FAST, "--router-policy", "round-robin"])
    run.wait_ready()
    expected = uninterrupted(run, path, body)
    next_turn_to_rank_0(run)
    got = read_sse(run.router_port, path, body)
    assert got == {**expected, "rank": "0"} and got["finish"] != "abort"
    wait_for(lambda: resumed_on(run) == 1, 10, "the continuation to be counted")


def test_a_stop_string_that_straddles_the_cut_still_stops_the_answer(start):
    run = start(2, *LONG, *RANK0_DIES, options=[*FAST, "--router-policy", "round-robin"])
    run.wait_ready()
    text = uninterrupted(run, "/v1/completions", COMPLETION)["text"]
    stop = text[5:7]  # the 6th and 7th tokens: rank 0 dies between them
    assert stop not in text[:6]
    body = {**COMPLETION, "stop": [stop]}
    for _ in range(2):
        wait_for(lambda: run.all_ready(), 20, "both ranks ready")
        got = read_sse(run.router_port, "/v1/completions", body)
        assert got["text"] == text[:text.index(stop)] and got["finish"] == "stop"
    wait_for(lambda: resumed_on(run) == 1, 10, "the continuation to be counted")


def test_a_cut_after_the_last_token_finishes_without_asking_again(start):
    run = start(1, "--standin-die-before-done", options=[*FAST, "--max-restarts", "100"])
    run.wait_ready()
    port = run.status()["ranks"][0]["port"]
    asked = standin_metric(port, "standin_completions_total")
    got = read_sse(run.router_port, "/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}})
    assert got["finish"] == "stop" and got["usage"]["completion_tokens"] == 5  # the stand-in's 5-token answer
    wait_for(lambda: run.status()["ranks"][0]["attempt"] == 1 and run.all_ready(), 20, "rank 0 back")
    assert standin_metric(run.status()["ranks"][0]["port"], "standin_completions_total") == 0  # none asked of it
    assert asked == 0 and resumed_on(run) == 0


def test_a_second_cut_continues_again(start):
    """Three ranks, round-robin: the stream starts on rank 1, which dies; continues on rank 0,
    which dies too; ends on rank 2."""
    run = start(3, *LONG, "--standin-ranks", "0,1", "--standin-die-mid-stream", "6",
                options=[*FAST, "--router-policy", "round-robin", "--max-restarts", "100"])
    run.wait_ready()
    expected = read_sse(run.status()["ranks"][2]["port"], "/v1/chat/completions", CHAT)
    got = read_sse(run.router_port, "/v1/chat/completions", CHAT)
    assert got["text"] == expected["text"] and got["rank"] == "1"
    wait_for(lambda: resumed_on(run) == 2, 10, "two continuations")
    hops = [(e["rank"], e["to_rank"], e["tokens"]) for e in run.events() if e["kind"] == "resumed"]
    assert hops == [(1, 0, 6), (0, 2, 12)]


def test_a_client_gone_during_a_continuation_stops_its_rank(start):
    run = start(2, "--standin-stream-chunks", "200", "--standin-stream-delay", "0.05", *RANK0_DIES,
                options=[*FAST, "--router-policy", "round-robin"])
    run.wait_ready()
    rank1 = run.status()["ranks"][1]["port"]
    next_turn_to_rank_0(run)
    body = json.dumps({**CHAT}).encode()
    sock = socket.create_connection(("127.0.0.1", run.router_port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
    received = b""
    while received.count(b"data: ") < 12:  # the role chunk, 6 from rank 0, then rank 1's
        received += sock.recv(65536)
    wait_for(lambda: resumed_on(run) == 1, 10, "the continuation to be counted")
    sock.close()
    wait_for(lambda: standin_metric(rank1, "standin_streams_aborted_total") == 1, 10,
             "rank 1 to see the client gone and stop")


def test_the_openai_client_reads_a_cut_stream_whole_and_raises_nothing(start):
    run = start(2, *LONG, *RANK0_DIES, options=[*FAST, "--router-policy", "round-robin"])
    run.wait_ready()
    expected = uninterrupted(run, "/v1/chat/completions", CHAT)["text"]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{run.router_port}/v1", api_key="unused", max_retries=0)
    for _ in range(2):
        wait_for(lambda: run.all_ready(), 20, "both ranks ready")
        chunks = client.chat.completions.create(model="standin-model", messages=CHAT["messages"], stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    wait_for(lambda: resumed_on(run) == 1, 10, "the continuation to be counted")


def test_a_stream_that_cannot_continue_still_ends_with_an_error_event(start):
    run = start(2, *LONG, *RANK0_DIES, options=[*FAST, "--router-policy", "round-robin"])
    run.wait_ready()
    bodies = []
    for _ in range(2):  # n=2 is not resumable: the one on rank 0 is cut as before
        wait_for(lambda: run.all_ready(), 20, "both ranks ready")
        bodies.append(request(run, "POST", "/v1/completions", json.dumps({**COMPLETION, "n": 2}).encode())[2])
    cut = [b for b in bodies if b'"error"' in b]
    assert len(cut) == 1 and cut[0].rstrip().endswith(b"data: [DONE]")
    assert resumed_on(run) == 0


def test_a_planned_restart_hands_its_streams_to_another_rank(start):
    """--drain-timeout 1: a stream that would run 10 s on rank 0 moves to rank 1 when rank 0 is
    restarted, and the restart does not wait for it."""
    token = "handoff-t0ken"
    run = start(2, "--standin-stream-chunks", "100", "--standin-stream-delay", "0.1",
                options=["--router-policy", "round-robin", "--drain-timeout", "1", "--restart-policy", "on-failure"],
                env={"SUPERVISOR_ADMIN_TOKEN": token})
    run.wait_ready()
    expected = uninterrupted(run, "/v1/chat/completions", CHAT)["text"]
    next_turn_to_rank_0(run)
    result: list = []
    thread = threading.Thread(target=lambda: result.append(read_sse(run.router_port, "/v1/chat/completions", CHAT)))
    thread.start()
    wait_for(lambda: run.status()["ranks"][0]["inflight"] == 1, 10, "the stream on rank 0")
    assert post(run, "/ranks/0/restart", token)[0] == 200
    wait_for(lambda: run.status()["ranks"][0]["attempt"] == 1, 20, "rank 0 restarted before the stream ended")
    thread.join()
    assert result and result[0]["text"] == expected and result[0]["rank"] == "0"
    drained = [e for e in run.events() if e["kind"] == "drained"]
    assert drained and drained[0]["handed_off"] is True and drained[0]["left"] == 0
    assert resumed_on(run) == 1


def test_a_stream_on_a_rank_that_goes_quiet_continues_elsewhere_before_the_rank_is_judged(start):
    """A SIGSTOPped rank sends nothing: after --stall-timeout the router reports it and hands its
    streams to another rank at once, instead of waiting ~10 s for the judgment."""
    run = start(2, "--standin-stream-chunks", "40", "--standin-stream-delay", "0.05",
                options=["--router-policy", "round-robin", "--stall-timeout", "0.5", "--deep-probe-interval", "0"])
    run.wait_ready()
    expected = uninterrupted(run, "/v1/chat/completions", CHAT)
    next_turn_to_rank_0(run)
    stopped: list[int] = []

    def stop_rank_0() -> None:
        wait_for(lambda: run.status()["ranks"][0]["inflight"] == 1, 10, "the stream on rank 0")
        pid = run.status()["ranks"][0]["pid"]
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)
    stopper = threading.Thread(target=stop_rank_0)
    stopper.start()
    try:
        got = read_sse(run.router_port, "/v1/chat/completions", CHAT)
    finally:
        stopper.join()
    assert stopped and got["text"] == expected["text"] and got["rank"] == "0"
    wait_for(lambda: resumed_on(run) == 1, 10, "the continuation to be counted")
    states = [e["new"] for e in run.events() if e["kind"] == "state" and e["rank"] == 0]
    assert "stalled" in states


def test_under_restart_policy_never_a_crash_stops_the_pod_but_its_streams_finish_elsewhere(start):
    """One rank's crash ends the pod (--restart-policy never), and the router drains before the
    other ranks stop: the streams the crash cut continue on a rank still serving."""
    run = start(2, *LONG, *RANK0_DIES, options=["--router-policy", "round-robin", "--restart-policy", "never"])
    run.wait_ready()
    expected = uninterrupted(run, "/v1/chat/completions", CHAT)
    next_turn_to_rank_0(run)
    got = read_sse(run.router_port, "/v1/chat/completions", CHAT)
    assert got["text"] == expected["text"] and got["rank"] == "0"
    assert run.wait_exit() == 6  # rank 0 exited with 3, a code of its own that reads as ours: 6


@pytest.mark.parametrize("dies_after", [4, 5, 7])
def test_an_answer_in_kana_and_emoji_cut_inside_a_character_reads_whole_and_never_the_prompt(start, dies_after):
    """The stand-in's unicode model writes characters of 2-4 byte tokens and, like vLLM's fast
    detokenizer, shows its prompt's own text when a prompt of ids ends inside a character. Cut
    after `dies_after` tokens (inside a character or not), the chat with no limit continues from the
    last whole character, and the client reads the uninterrupted answer."""
    secret = {"role": "system", "content": "Internal: the discount code is ZX-41."}
    body = {**CHAT, "messages": [secret, *CHAT["messages"]], "return_token_ids": True,
            "stream_options": {"include_usage": True}}
    run = start(2, *LONG, "--standin-unicode", "--standin-ranks", "0", "--standin-die-mid-stream", str(dies_after),
                options=[*FAST, "--router-policy", "round-robin", "--max-restarts", "100"])
    run.wait_ready()
    expected = uninterrupted(run, "/v1/chat/completions", body)
    assert any(ord(c) > 0x3000 for c in expected["text"]) and expected["usage"]["completion_tokens"] > dies_after
    next_turn_to_rank_0(run)
    got = read_sse(run.router_port, "/v1/chat/completions", body)
    assert got == {**expected, "rank": "0"} and "ZX-41" not in got["text"]
    wait_for(lambda: resumed_on(run) == 1, 10, "the continuation to be counted")
