"""api/rank_metrics.py: every rank's vllm:* series merged with a rank label (pure), and fetched once
at a time however many scrape."""

from __future__ import annotations

from harness import samples_of
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from vllm_dp_supervisor.api.rank_metrics import merge

RANK_TEXT = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="1.0",model_name="m"} 1.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="m"} 2.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="m"} 2.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="m"} 3.5
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 7.0
vllm:unlabelled 1.0
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 1.0
"""


def test_each_family_once_with_every_ranks_samples_labelled():
    text = merge({1: RANK_TEXT, 0: RANK_TEXT.replace(" 2.0\n", " 5.0\n", 1)})
    assert text.count("# TYPE vllm:num_requests_running gauge") == 1
    assert text.count("# HELP vllm:e2e_request_latency_seconds ") == 1
    assert "python_gc" not in text  # a rank's own process series would clash with the supervisor's
    got = samples_of(text)
    running = (("engine", "0"), ("model_name", "m"))
    assert got[("vllm:num_requests_running", (*running, ("rank", "0")))] == 5.0
    assert got[("vllm:num_requests_running", (*running, ("rank", "1")))] == 2.0
    assert got[("vllm:e2e_request_latency_seconds_bucket",
                (("engine", "0"), ("le", "+Inf"), ("model_name", "m"), ("rank", "1")))] == 2.0
    assert got[("vllm:unlabelled", (("rank", "0"),))] == 1.0
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert types["vllm:e2e_request_latency_seconds"] == "histogram" and types["vllm:prompt_tokens"] == "counter"

def test_nothing_from_no_rank():
    assert merge({}) == ""

LABEL_VALUE = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters='\\"\n'), max_size=8)


@given(st.dictionaries(st.integers(0, 7), st.lists(st.tuples(st.sampled_from(["a", "b_total", "c"]),
                                                              st.dictionaries(st.sampled_from(["x", "model_name"]),
                                                                              LABEL_VALUE, max_size=2),
                                                              st.floats(0, 1e6)), max_size=6), max_size=4))
def test_every_sample_of_every_rank_survives_once_with_its_rank(ranks):
    texts = {}
    for rank, rows in ranks.items():
        lines = []
        for name, labels, value in rows:
            inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            lines.append(f"vllm:{name}{{{inner}}} {value!r}" if labels else f"vllm:{name} {value!r}")
        texts[rank] = "\n".join(lines) + "\n"
    expected: dict = {}
    for rank, rows in ranks.items():
        for name, labels, value in rows:
            expected[(f"vllm:{name}", tuple(sorted({**labels, "rank": str(rank)}.items())))] = value
    merged = merge(texts)
    assert samples_of(merged) == expected
    assert len([line for line in merged.split("\n") if line and not line.startswith("#")]) == \
        sum(len(rows) for rows in ranks.values())

def test_scrapes_at_once_ask_the_ranks_once():
    import asyncio

    from vllm_dp_supervisor.api.rank_metrics import RankMetrics
    from vllm_dp_supervisor.core.snapshot import PodView, RankView, Snapshots
    from vllm_dp_supervisor.core.states import RankState, SupervisorState

    asked: list[str] = []

    class SlowProber:
        async def get_text(self, url: str, timeout: float, max_bytes: int):
            asked.append(url)
            await asyncio.sleep(0.05)
            return None, "vllm:x 1\n"

    view = PodView(1, SupervisorState.RUNNING, False, 1, (RankView(0, 8000, 1, RankState.READY, 0, 0),))
    metrics = RankMetrics(SlowProber(), Snapshots(view), ["http://127.0.0.1:8000"], 1.0,  # type: ignore[arg-type]
                          lambda rank, why: None)

    async def scenario() -> list[bytes]:
        together = await asyncio.gather(*(metrics.collect() for _ in range(10)))
        return [*together, await metrics.collect()]  # a later scrape asks again
    answers = asyncio.run(scenario())
    assert answers == [b'vllm:x{rank="0"} 1\n'] * 11
    assert asked == ["http://127.0.0.1:8000/metrics"] * 2
