"""What deploy/monitoring's dashboard and alerts ask Prometheus for, and what a scrape of the
supervisor really holds, so a test can hold one against the other."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
# A series name in PromQL: ours, vLLM's (with its colon), the standard process_* ones.
SERIES = re.compile(r"\b(?:supervisor_[a-z0-9_]+|vllm:[a-z0-9_:]+|process_[a-z0-9_]+)")


def dashboard() -> dict[str, Any]:
    return json.loads((MONITORING / "dashboard.json").read_text())


def queries() -> list[str]:
    """Every PromQL expression: the dashboard's panels and variables, the alert rules."""
    board = dashboard()
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in board["templating"]["list"] if isinstance(v.get("query"), dict)]
    rules = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    exprs += [r["expr"] for g in rules["spec"]["groups"] for r in g["rules"]]
    return exprs


def queried_series() -> set[str]:
    return {name for expr in queries() for name in SERIES.findall(expr)}


def exported_series(exposition: str) -> set[str]:
    """Every name a query may use: sample names (with _total, _bucket, ...) and family names,
    so a family that has no sample yet still counts."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        names.update(s.name for s in family.samples)
    return names
