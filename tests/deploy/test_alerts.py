"""deploy/monitoring's alerts, run by Prometheus's own promtool: every rule checked, and unit tested
firing and not firing (alerts_test.yaml); every rule explained in the runbook page it links to;
the release label and the runbook URL set in one place (settings.yaml)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_check import BIN
from harness import ROOT

MONITORING = ROOT / "deploy" / "monitoring"
TESTS = Path(__file__).with_name("alerts_test.yaml")
RUNBOOK = ROOT / "docs" / "runbook.md"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not installed: `make test` installs Debian's `prometheus` package when run as "
                    "root; else apt-get install prometheus (or put Prometheus's promtool on PATH)")
    return found


def rendered(monitoring: Path = MONITORING) -> list[dict[str, Any]]:
    out = subprocess.run([str(BIN / "kubectl"), "kustomize", str(monitoring)], check=True, capture_output=True,
                         text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind)


def settings() -> dict[str, str]:
    return yaml.safe_load((MONITORING / "settings.yaml").read_text())["data"]


def rules() -> list[dict[str, Any]]:
    return [r for g in of_kind(rendered(), "PrometheusRule")["spec"]["groups"] for r in g["rules"]]


@pytest.fixture(scope="module")
def rule_dir(tmp_path_factory) -> Path:
    """rules.yaml (the rendered PrometheusRule's groups) beside the unit tests, the runbook URL filled in."""
    where = tmp_path_factory.mktemp("alerts")
    groups = of_kind(rendered(), "PrometheusRule")["spec"]["groups"]
    (where / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    (where / TESTS.name).write_text(TESTS.read_text().replace("RUNBOOK#", settings()["runbook"] + "#"))
    return where


def test_promtool_checks_the_rules(rule_dir):
    result = subprocess.run([promtool(), "check", "rules", "rules.yaml"], cwd=rule_dir, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass(rule_dir):
    result = subprocess.run([promtool(), "test", "rules", TESTS.name], cwd=rule_dir, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def broken(rule_dir: Path, tmp_path: Path, alert: str, old: str, new: str) -> subprocess.CompletedProcess:
    """promtool's unit tests run on the rules with `old` replaced by `new` in `alert`'s expression."""
    shutil.copy(rule_dir / TESTS.name, tmp_path / TESTS.name)
    doc = yaml.safe_load((rule_dir / "rules.yaml").read_text())
    rule = next(r for g in doc["groups"] for r in g["rules"] if r.get("alert") == alert)
    assert old in rule["expr"]
    rule["expr"] = rule["expr"].replace(old, new)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(doc))
    return subprocess.run([promtool(), "test", "rules", TESTS.name], cwd=tmp_path, capture_output=True, text=True)


def test_a_broken_rule_fails_its_unit_test(rule_dir, tmp_path):
    """The unit tests can fail: a threshold loosened makes one fire where it must not."""
    result = broken(rule_dir, tmp_path, "VllmRankRestartLoop", ">= 3", ">= 1")
    assert result.returncode != 0 and "VllmRankRestartLoop" in result.stdout + result.stderr


def test_a_pod_scraped_on_both_ports_alerts_once_only_with_max_not_sum(rule_dir, tmp_path):
    """The router's /metrics is the supervisor's (pod_metrics.py): a pod scraped on both ports has
    every series twice. A sum would read a rank's state as 2 and VllmRankDown would never fire."""
    result = broken(rule_dir, tmp_path, "VllmRankDown", "max by", "sum by")
    assert result.returncode != 0 and "VllmRankDown" in result.stdout + result.stderr


def test_every_rule_is_unit_tested_firing_and_not_firing():
    cases = [case for test in yaml.safe_load(TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    for rule in rules():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{rule['alert']} is never tested firing"
        assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']} is never tested not firing"


def test_every_rule_says_what_it_means_and_links_its_runbook_section():
    page = RUNBOOK.read_text()
    sections = {m.group(1) for m in re.finditer(r"^## (\w+)$", page, re.M)}
    for rule in rules():
        notes = rule["annotations"]
        assert notes.get("summary") and notes.get("description"), rule["alert"]
        assert notes["runbook_url"] == f"{settings()['runbook']}#{rule['alert'].lower()}", notes["runbook_url"]
        assert rule["alert"] in sections, f"docs/runbook.md has no section '## {rule['alert']}'"
    for alert in sections:
        body = page.split(f"## {alert}\n", 1)[1].split("\n## ", 1)[0]
        for part in ("**Means**", "**Confirm**", "**Do**"):
            assert part in body, f"{alert}: {part} missing"


def test_alerts_on_flapping_signals_wait_before_firing():
    waits = {r["alert"]: r.get("for") for r in rules()}
    for alert in ("VllmSupervisorTargetDown", "VllmSupervisorCrashLooping", "VllmDeepProbeFailing", "VllmRankDown"):
        assert waits[alert], f"{alert} fires on one evaluation"


def test_the_release_label_is_set_in_one_place(tmp_path):
    """kube-prometheus-stack's default selectors want `release: <its release>` on both objects."""
    docs = rendered()
    want = settings()["release"]
    for kind in ("PodMonitor", "PrometheusRule"):
        assert of_kind(docs, kind)["metadata"]["labels"]["release"] == want
    assert "vllm-dp-supervisor-monitoring-settings" not in str(docs)  # local config: never applied
    copy = tmp_path / "monitoring"
    shutil.copytree(MONITORING, copy)
    text = (copy / "settings.yaml").read_text()
    (copy / "settings.yaml").write_text(text.replace(f"release: {want}", "release: prom-ops").replace(
        settings()["runbook"], "https://runbooks.internal/vllm/"))
    docs = rendered(copy)
    for kind in ("PodMonitor", "PrometheusRule"):
        assert of_kind(docs, kind)["metadata"]["labels"]["release"] == "prom-ops"
    urls = {r["annotations"]["runbook_url"] for g in of_kind(docs, "PrometheusRule")["spec"]["groups"]
            for r in g["rules"]}
    assert urls and all(u.startswith("https://runbooks.internal/vllm/#vllm") for u in urls)


def test_every_pod_is_scraped_under_the_job_the_alerts_select():
    monitor = of_kind(rendered(), "PodMonitor")
    relabel = monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]
    assert {"targetLabel": "job", "replacement": "vllm-dp-supervisor"} in relabel
    scraped = [r["expr"] for r in rules() if "up{" in r["expr"] or "process_" in r["expr"]]
    assert scraped and all('job="vllm-dp-supervisor"' in expr for expr in scraped)

