"""json_log.py: the records a log collector gets. Pure, fast."""

from __future__ import annotations

import asyncio
import json
import logging

from hypothesis import given
from hypothesis import strategies as st

from vllm_dp_supervisor.output import json_log
from vllm_dp_supervisor.output.json_log import JsonFormatter, RankJsonLines, severity_of


def records(lines: list[str], stream: str = "stderr") -> list[dict]:
    written: list[bytes] = []
    sink = RankJsonLines(3, stream, written.append)
    for line in lines:
        sink.line(line)
    sink.flush()  # the end of the stream
    return [json.loads(w) for w in written]


CHAINED = [
    "Traceback (most recent call last):",
    '  File "/x/a.py", line 1, in f',
    "    raise KeyError('k')",
    "KeyError: 'k'",
    "",
    "During handling of the above exception, another exception occurred:",
    "",
    "Traceback (most recent call last):",
    '  File "/x/b.py", line 2, in g',
    "ValueError: bad model config",
]


def test_a_chained_traceback_is_one_record_and_the_next_line_its_own():
    got = records(["INFO 11-22 10:00:00 [x.py:1] loading", *CHAINED, "after it"])
    assert [r["message"] for r in got] == ["INFO 11-22 10:00:00 [x.py:1] loading", "\n".join(CHAINED), "after it"]
    assert [r["severity"] for r in got] == ["INFO", "ERROR", "WARNING"]
    assert all(r["rank"] == 3 and r["stream"] == "stderr" for r in got)


def test_vllm_prefixed_tracebacks_and_an_exceptions_indented_details_stay_together():
    lines = ["(EngineCore_DP0 pid=9) ERROR 11-22 10:00:00 [core.py:1] Traceback (most recent call last):",
             '(EngineCore_DP0 pid=9) ERROR 11-22 10:00:00 [core.py:1]   File "x", line 1',
             "(EngineCore_DP0 pid=9) ERROR 11-22 10:00:00 [core.py:1] pydantic_core.ValidationError: 1 error",
             "(EngineCore_DP0 pid=9) ERROR 11-22 10:00:00 [core.py:1]   Value error, max_model_len too big",
             "(EngineCore_DP0 pid=9) INFO 11-22 10:00:01 [core.py:2] shutting down"]
    got = records(lines)
    assert [r["message"] for r in got] == ["\n".join(lines[:4]), lines[4]]
    assert [r["severity"] for r in got] == ["ERROR", "INFO"]


def test_a_traceback_cut_off_by_the_end_of_the_stream_is_still_sent():
    assert [r["message"] for r in records(CHAINED[:3])] == ["\n".join(CHAINED[:3])]


def test_a_traceback_the_stream_goes_quiet_after_is_sent_without_waiting_for_more():
    written: list[bytes] = []

    async def scenario() -> None:
        sink = RankJsonLines(0, "stderr", written.append)
        for line in CHAINED:
            sink.line(line)
        assert written == []  # a chained one may follow
        await asyncio.sleep(json_log.QUIET_S * 3)
    asyncio.run(scenario())
    assert [json.loads(w)["message"] for w in written] == ["\n".join(CHAINED)]


def test_a_rank_line_that_is_a_json_object_is_merged_with_its_own_level_and_message():
    """A rank started with vLLM's JSON logging: a WARNING read as INFO, the line quoted whole."""
    got = records(['{"levelname": "WARNING", "message": "Triton is not installed", "name": "vllm.triton", '
                   '"time": "theirs", "rank": 99, "lineno": 22}', '{"level": "error", "msg": "dead"}', '{"x": 1}',
                   "{not json}"], stream="stdout")
    assert got[0]["severity"] == "WARNING" and got[0]["message"] == "Triton is not installed"
    assert got[0]["name"] == "vllm.triton" and got[0]["lineno"] == 22
    assert got[0]["rank"] == 3 and got[0]["stream"] == "stdout" and got[0]["time"] != "theirs"  # ours win
    assert "levelname" not in got[0]
    assert (got[1]["severity"], got[1]["message"]) == ("ERROR", "dead")
    assert (got[2]["severity"], got[2]["message"], got[2]["x"]) == ("INFO", "", 1)  # no level: by its stream
    assert got[3]["message"] == "{not json}"


def test_a_supervisor_line_with_fields_carries_them_as_data():
    record = logging.LogRecord("supervisor", logging.INFO, __file__, 1, "status: %s", ('{"ready": true}',), None)
    record.fields = {"status": {"ready": True}, "time": "not ours"}
    record.json_message = "status (SIGUSR1)"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["status"] == {"ready": True} and entry["message"] == "status (SIGUSR1)"
    assert entry["time"] != "not ours" and list(entry)[:2] == ["time", "severity"]


def test_severity_comes_from_the_line_when_it_names_one():
    assert severity_of("WARNING 11-22 10:00:00 [x.py:1] slow", "stdout") == "WARNING"
    assert severity_of("(APIServer pid=1) ERROR 11-22 10:00:00 [x.py:1] dead", "stdout") == "ERROR"
    assert severity_of("INFO:     127.0.0.1:5 - \"GET /health HTTP/1.1\" 200 OK", "stderr") == "INFO"
    assert severity_of("plain", "stdout") == "INFO" and severity_of("plain", "stderr") == "WARNING"


@given(st.lists(st.text(max_size=40), max_size=30))
def test_every_line_reaches_exactly_one_record_in_order(lines):
    lines = [line.replace("\n", " ").replace("\r", " ").replace("{", "(") for line in lines]  # no JSON lines
    got = records(lines)
    joined = "\n".join(r["message"] for r in got)
    # trailing blank lines of a traceback are dropped; everything else is there, in order
    assert [l for l in joined.split("\n") if l.strip()] == [l for l in lines if l.strip()]


def test_the_supervisors_own_line_with_an_exception_is_one_record():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys
        record = logging.LogRecord("supervisor", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info())
    record.rank = 2
    entry = json.loads(JsonFormatter().format(record))
    assert entry["severity"] == "ERROR" and entry["rank"] == 2
    assert entry["message"].startswith("failed x\nTraceback (most recent call last):")
    assert entry["message"].endswith("RuntimeError: boom")
    assert entry["time"].endswith("Z") and "T" in entry["time"]
