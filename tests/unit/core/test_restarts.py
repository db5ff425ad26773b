"""restarts.py: policy, limit within a window, doubling backoff with jitter. Pure, fast."""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from vllm_dp_supervisor.core.restarts import JITTER, MAX_BACKOFF_S, RestartBudget, RestartPolicy
from vllm_dp_supervisor.settings.config import Config

DEFAULTS = Config(dp_size_local=1).restart_rules  # the documented defaults, from one place


def budget(**kw) -> RestartBudget:
    return RestartBudget(dataclasses.replace(DEFAULTS, **kw))


def test_the_default_policy_restarts_a_crash():
    assert DEFAULTS.policy is RestartPolicy.ON_FAILURE and RestartBudget(DEFAULTS).decide(0, 1, 0.5).restart


def test_never_restarts_nothing():
    d = RestartBudget(dataclasses.replace(DEFAULTS, policy=RestartPolicy.NEVER)).decide(0, 1, 0.5)
    assert not d.restart and d.why == "--restart-policy never"


def test_no_restart_codes_only_under_on_failure():
    assert "not retried" in budget().decide(0, 2, 0.5).why
    assert budget(policy=RestartPolicy.ALWAYS).decide(0, 2, 0.5).restart
    assert budget().decide(0, None, 0.5).restart  # a hung rank has no exit code: restarted


@given(base=st.floats(0.01, 100), jitters=st.lists(st.floats(0, 0.999), min_size=1, max_size=12))
def test_delays_double_within_jitter_and_never_pass_the_cap(base, jitters):
    b = budget(max_restarts=100, backoff_s=base)
    for k, j in enumerate(jitters):
        d = b.decide(k, 1, j)
        assert d.restart
        nominal = min(MAX_BACKOFF_S, base * 2 ** k)
        low, high = min(MAX_BACKOFF_S, nominal * (1 - JITTER)), min(MAX_BACKOFF_S, nominal * (1 + JITTER))
        assert low - 1e-9 <= d.delay_s <= high + 1e-9


@given(n=st.integers(0, 6), window=st.floats(1, 1000))
def test_at_most_n_within_the_window_then_again_after_it(n, window):
    b = budget(max_restarts=n, window_s=window)
    assert [b.decide(0, 1, 0.5).restart for _ in range(n + 1)] == [True] * n + [False]
    assert "restart limit reached" in b.decide(0, 1, 0.5).why
    assert b.decide(window + 0.001, 1, 0.5).restart == (n > 0)


def test_stable_rank_starts_over_from_the_first_delay():
    b = budget(max_restarts=10, backoff_s=1, stable_after_s=60)
    first = [b.decide(t, 1, 0.5).delay_s for t in range(3)]
    assert first == [1, 2, 4]
    b.note_ready_for(59)
    assert b.decide(3, 1, 0.5).delay_s == 8
    b.note_ready_for(60)
    assert b.decide(4, 1, 0.5).delay_s == 1
    assert b.total == 5
