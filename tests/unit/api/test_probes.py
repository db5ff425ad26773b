"""api/probes.py: the probe paths' answers, read from the published view. Pure."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_dp_supervisor.api import probes
from vllm_dp_supervisor.core.snapshot import PodView, RankView
from vllm_dp_supervisor.core.states import RankState, SupervisorState


def view(*states: RankState, pod: SupervisorState = SupervisorState.RUNNING, draining: bool = False,
         quorum: int | None = None) -> PodView:
    ranks = tuple(RankView(i, 8000 + i, 100 + i, s, 0, 0) for i, s in enumerate(states))
    return PodView(1, pod, draining, len(states) if quorum is None else quorum, ranks)


def test_ready_live_and_one_rank_read_the_view():
    up = view(RankState.READY, RankState.READY)
    assert probes.answer(up, b"/ready") == probes.answer(up, b"/health") == (200, {"ready": True})
    assert probes.answer(up, b"/livez") == (200, {"live": True})
    half = view(RankState.READY, RankState.STARTING)
    assert probes.answer(half, b"/readyz") == (503, {"ready": False, "stopping": False,
                                                     "not_ready": [{"rank": 1, "state": "starting"}]})
    assert probes.answer(half, b"/ready/0") == (200, {"rank": 0, "ready": True})
    assert probes.answer(half, b"/ready/1") == (503, {"rank": 1, "ready": False})
    on_quorum = view(RankState.READY, RankState.BACKOFF, quorum=1)
    assert probes.answer(on_quorum, b"/ready") == (200, {"ready": True, "not_ready": [{"rank": 1, "state": "backoff"}]})
    stopping = view(RankState.READY, pod=SupervisorState.STOPPING)
    assert probes.answer(stopping, b"/live") == (503, {"live": False, "stopping": True})
    assert probes.answer(view(RankState.READY, draining=True), b"/ready/0")[0] == 503


@pytest.mark.parametrize(("path", "status"), [(b"/ready/2", 404), (b"/ready/x", 400), (b"/ready/\xc2\xb2", 400),
                                              (b"/ready/123456", 400), (b"/ready/", 400)])
def test_a_bad_rank_is_a_4xx(path, status):
    assert probes.answer(view(RankState.READY, RankState.READY), path)[0] == status  # type: ignore[index]


@given(st.binary(max_size=20))
def test_any_other_path_is_left_to_the_app_and_every_answer_is_json(path):
    found = probes.answer(view(RankState.READY, RankState.EXITED), path)
    if found is None:
        assert path not in probes.READY_PATHS | probes.LIVE_PATHS and not path.startswith(probes.RANK_PREFIX)
    else:
        status, body = probes.encoded(found)
        assert json.loads(body) == found[1] and 200 <= status < 600
