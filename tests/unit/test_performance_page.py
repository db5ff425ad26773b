"""docs/performance.md's token-path table is the last run's (bench/results/token.md), figure for figure."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def figures(text: str) -> list[tuple[str, ...]]:
    """The numbers of each row of the token-path table, in order."""
    rows = [line for line in text.splitlines() if line.startswith("| ") and ("nginx" in line or "ours" in line
                                                                           or "direct" in line)]
    return [tuple(re.findall(r"[\d,.]+%?|x[\d.]+", row.split("|", 2)[2])) for row in rows]


def test_the_manual_s_token_table_is_the_bench_s_last_run():
    manual = (ROOT / "docs" / "performance.md").read_text().split("### The token path", 1)[1].split("\n## ", 1)[0]
    results = (ROOT / "bench" / "results" / "token.md").read_text()
    assert figures(manual) and figures(manual) == figures(results)
