"""rank_output.py: what a rank's output says about it. Pure, fast."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from vllm_dp_supervisor.output.ranks import NO_CAUSE_ABOVE, RankOutput, last_error


def test_an_info_line_is_not_an_error():
    """A hung rank's last line was shown as its error: 'INFO: Application startup complete.'"""
    assert last_error(["INFO:     Application startup complete."]) is None
    assert last_error(["(APIServer pid=7) INFO 11-22 14:00:00 [api_server.py:1] Starting vLLM"]) is None
    assert last_error(["standin: engine dead, answering 500", "INFO:     127.0.0.1 - GET /health 500"]) == \
        "standin: engine dead, answering 500"


def test_a_warning_is_never_the_last_error_and_an_error_line_is():
    """Seen with real vLLM: a SIGKILLed rank's 'last error' was its start-up Triton warning."""
    triton = ("(APIServer pid=9) WARNING 12-03 10:00:00 [__init__.py:22] Triton is not installed. "
              "triton-cpu is expected on x86 CPUs.")
    assert last_error([triton, "INFO:     Started server process [9]"]) is None
    assert last_error(["WARNING:root:cannot find the cache", "Loading safetensors shards: 100%|#####|"]) is None
    assert last_error(["ERROR 12-03 10:00:01 [core.py:1] EngineCore failed to start.", triton]) == \
        "ERROR 12-03 10:00:01 [core.py:1] EngineCore failed to start."
    assert last_error(["vllm: error: argument --max-model-len: invalid int value: 'x'"]) == \
        "vllm: error: argument --max-model-len: invalid int value: 'x'"
    assert last_error(["[CRITICAL] no GPU left", "[warn] slow"]) == "[CRITICAL] no GPU left"


def test_a_json_line_is_judged_by_its_own_level_and_gives_its_message():
    lines = ['{"levelname": "ERROR", "message": "EngineCore failed: no memory", "name": "vllm"}',
             '{"levelname": "WARNING", "message": "Triton is not installed"}', '{"level": "info", "msg": "x"}']
    assert last_error(lines) == "EngineCore failed: no memory"
    assert last_error(lines[1:]) is None
    assert last_error(['{"severity": "fatal", "msg": "out of devices"}']) == "out of devices"


def test_the_reason_line_after_a_pydantic_error_is_kept():
    lines = [
        "Traceback (most recent call last):",
        '  File "/x/vllm/engine/arg_utils.py", line 1, in create_model_config',
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig",
        "  Value error, User-specified max_model_len (99999) is greater than the derived max_model_len "
        "(max_position_embeddings=8192). [type=value_error, input_value=ArgsKwargs((), {}), input_type=ArgsKwargs]",
        "    For further information visit https://errors.pydantic.dev/2.12/v/value_error",
    ]
    assert last_error(lines) == (
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig: Value error, "
        "User-specified max_model_len (99999) is greater than the derived max_model_len "
        "(max_position_embeddings=8192). [type=value_error, input_value=ArgsKwargs((), {}), input_type=ArgsKwargs]")


def test_engine_core_prefixes_are_removed_and_the_last_traceback_wins():
    lines = ["(EngineCore pid=9) Traceback (most recent call last):", "(EngineCore pid=9)   File \"x\", line 1",
             "(EngineCore pid=9) RuntimeError: first", "Traceback (most recent call last):", "  File \"y\"",
             "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue."]
    assert last_error(lines) == "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue."


DEAD = ("vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. See stack trace (above) "
        "for the root cause.")


def test_an_engine_dead_error_names_the_engine_s_own_exception_or_says_there_was_none():
    """vLLM 0.32's EngineDeadError points at the engine's traceback: that is why. An engine
    SIGKILLed or OOM-killed leaves none: said so, not the pointer alone."""
    engine = ["(EngineCore_DP0 pid=9) ERROR EngineCore encountered a fatal error.",
              "(EngineCore_DP0 pid=9) Traceback (most recent call last):", '(EngineCore_DP0 pid=9)   File "x"',
              "(EngineCore_DP0 pid=9) torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"]
    server = ["(APIServer pid=8) ERROR AsyncLLM output_handler failed.", "Traceback (most recent call last):",
              '  File "y"', DEAD]
    assert last_error(engine + server) == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert last_error(server) == DEAD + NO_CAUSE_ABOVE and "SIGKILL" in NO_CAUSE_ABOVE


def _feed(chunks: list[bytes]) -> RankOutput:
    out = RankOutput(0, None)

    async def run() -> None:
        reader = asyncio.StreamReader()
        for chunk in chunks:
            reader.feed_data(chunk)
        reader.feed_eof()
        await out.pump(reader, "stderr")
    asyncio.run(run())
    return out


def test_a_progress_bar_redrawn_with_carriage_returns_is_the_last_line():
    out = RankOutput(0, None)

    async def run() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(b"Loading weights\n")
        reader.feed_data(b"\rLoading safetensors:  10%|#  | 1/10\rLoading safetensors:  50%|#####  | 5/10")
        task = asyncio.ensure_future(out.pump(reader, "stderr"))
        await asyncio.sleep(0.01)
        # no newline yet, yet the bar's latest state is what /status shows
        assert out.last_line == "Loading safetensors:  50%|#####  | 5/10"
        reader.feed_eof()
        await task
    asyncio.run(run())


@given(st.lists(st.binary(max_size=300), max_size=20))
def test_any_output_is_taken_whole(chunks):
    out = _feed(chunks)
    data = b"".join(chunks)
    assert len(out.stderr_tail) <= 50
    if data.decode("utf-8", errors="replace").strip():
        assert out.last_line is not None
    last_error(out.stderr_tail)  # never raises


def test_vllm_root_cause_above_is_followed_to_the_root_cause():
    """Seen with --enable-fault-tolerance on vLLM's CPU build."""
    lines = [
        "(VllmWorker-0 pid=20349) ERROR 11-22 15:21:26 [multiproc_executor.py:953] Traceback (most recent call last):",
        '(VllmWorker-0 pid=20349) ERROR 11-22 15:21:26 [multiproc_executor.py:953]   File "x.py", line 1, in f',
        "(VllmWorker-0 pid=20349) ERROR 11-22 15:21:26 [multiproc_executor.py:953] ValueError: Fault tolerance "
        "requires an FT-capable all2all backend (one of ['deepep_low_latency', 'nixl_ep']), but got "
        "'allgather_reducescatter'.",
        "Traceback (most recent call last):",
        '  File "y.py", line 2, in g',
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
    ]
    assert last_error(lines) == ("ValueError: Fault tolerance requires an FT-capable all2all backend (one of "
                                 "['deepep_low_latency', 'nixl_ep']), but got 'allgather_reducescatter'.")
