"""The chaos soak (soak.py), short: every kind of action at least once under load, then SIGTERM.
`make soak` runs it for minutes (SOAK_SECONDS) and writes bench/results/soak.md."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from soak import ACTIONS, options, soak, standin_args

SECONDS = float(os.environ.get("SOAK_SECONDS", "0"))  # 0: each action once


@pytest.mark.soak
@pytest.mark.timeout(SECONDS + 300)
def test_chaos_under_load_loses_only_what_the_rules_allow_and_leaves_nothing(start, tag, tmp_path):
    run = start(3, *standin_args(tag), options=options(tmp_path),
                env={"TMPDIR": str(tmp_path)})
    run.wait_ready()
    report = soak(run, tag, SECONDS, seed=int(os.environ.get("SOAK_SEED", "1")))
    print("\n" + report.table())
    if os.environ.get("SOAK_REPORT"):
        Path(os.environ["SOAK_REPORT"]).write_text(report.table() + "\n")
    assert report.exit_code == 0, run.output()[-3000:]
    assert report.unexplained == [], report.unexplained[:20]
    assert report.outcomes["ok"] > 100
    assert report.leftovers == {"processes": [], "shm": [], "run_dirs": []}
    assert {a for _, a, _ in report.actions} == set(ACTIONS)
    assert "rollout done" in run.output() or any(d == "done" for _, a, d in report.actions if a == "rollout")
