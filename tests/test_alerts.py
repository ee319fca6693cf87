"""helm/gemmguard/files/alerts.yaml: promtool lints it and runs its unit tests, which must bite.

The unit tests (tests/promtool/alerts_test.yaml) give each alert a series that must fire it and a
healthy one that must not. To prove they test what they claim, each alert is also broken on purpose
(its expression replaced by one that never fires) and the unit tests must then fail.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import tool

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "gemmguard"
RULES = CHART / "files" / "alerts.yaml"
UNIT_TESTS = ROOT / "tests" / "promtool" / "alerts_test.yaml"
RUNBOOK = CHART / "RUNBOOK.md"

# The alerts the chart promises (issues 6 and 16); more may be added, none of these removed.
# GemmguardEngineNotLive (a gauge that died with the pod) became GemmguardCanaryFailing and
# GemmguardServerRestarted: chart README, "Upgrading", 0.2.0.
REQUIRED_ALERTS = {
    "GemmguardKernelFallback",
    "GemmguardSelfcheckFailed",
    "GemmguardSelfcheckDegraded",
    "GemmguardSelfcheckRefused",
    "GemmguardSelfcheckIncomplete",
    "GemmguardEngineFixMissing",
    "GemmguardCanaryFailing",
    "GemmguardServerRestarted",
    "GemmguardPodRecreated",  # issue 25: a LeaderWorkerSet group recreation empties the counters
    "GemmguardNotReady",
}
# DESIGN.md "The contract": every gemmguard metric name, the ones issue 16 adds (restarts and
# refusals, counted across container restarts); plus kube-state-metrics' readiness.
CONTRACT_METRICS = {
    "gemmguard_layer_kernel_info",
    "gemmguard_kernel_layers",
    "gemmguard_kernel_fallback_total",
    "gemmguard_selfcheck_passed",
    "gemmguard_selfcheck_complete",
    "gemmguard_selfcheck_policy_info",  # issue 23: which unchecked layers the operator allowed
    "gemmguard_selfcheck_layers",
    "gemmguard_selfcheck_duration_seconds",
    "gemmguard_selfcheck_excess_bits",
    "gemmguard_selfcheck_rejected_layers",
    "gemmguard_selfcheck_replacement_cost_ratio",
    "gemmguard_selfcheck_refusals_total",
    "gemmguard_engine_fix_info",
    "gemmguard_build_info",
    "gemmguard_engine_live",
    "gemmguard_canary_latency_seconds",
    "gemmguard_canary_failures_total",
    "gemmguard_server_restarts_total",
    "gemmguard_state_created_timestamp_seconds",  # issue 25: when the pod's counters began
    "kube_pod_container_status_ready",
}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, timeout=120, check=False
    )


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_rules_pass_promtool_check() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_tests_pass() -> None:
    result = _promtool("test", "rules", str(UNIT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_required_alerts_exist() -> None:
    names = {rule["alert"] for rule in _rules()}
    assert REQUIRED_ALERTS <= names, f"missing alerts: {sorted(REQUIRED_ALERTS - names)}"


@pytest.mark.parametrize("rule", _rules(), ids=lambda rule: rule["alert"])
def test_alert_is_documented(rule: dict[str, Any]) -> None:
    annotations = rule["annotations"]
    assert annotations.get("summary") and annotations.get("description")
    anchor = rule["alert"].lower()
    assert annotations["runbook_url"].endswith(f"/helm/gemmguard/RUNBOOK.md#{anchor}")
    assert f"\n## {rule['alert']}\n" in RUNBOOK.read_text(), (
        f"RUNBOOK.md has no section {rule['alert']}"
    )
    assert rule["labels"]["severity"] in {"warning", "critical"}


@pytest.mark.parametrize("rule", _rules(), ids=lambda rule: rule["alert"])
def test_alert_uses_contract_metrics(rule: dict[str, Any]) -> None:
    names = set(re.findall(r"\b(gemmguard_[a-z_]+|kube_[a-z_]+)\b", rule["expr"]))
    assert names, f"{rule['alert']} reads no known metric"
    assert names <= CONTRACT_METRICS, (
        f"{rule['alert']} reads unknown metrics {names - CONTRACT_METRICS}"
    )


@pytest.mark.parametrize("alert", sorted(REQUIRED_ALERTS))
def test_each_alert_has_a_firing_and_a_healthy_case(alert: str) -> None:
    groups = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    fired, healthy = False, False
    for group in groups:
        evals = [e for e in group["alert_rule_test"] if e["alertname"] == alert]
        if not evals:
            continue
        firing_pods = {a["exp_labels"].get("pod") for e in evals for a in e["exp_alerts"]}
        fired = fired or bool(firing_pods)
        series_pods = {
            m for s in group["input_series"] for m in re.findall(r'pod="([^"]+)"', s["series"])
        }
        # A pod with input series that no evaluation expects to alert is the healthy case.
        healthy = healthy or bool(series_pods - firing_pods)
    assert fired, f"no unit test expects {alert} to fire"
    assert healthy, f"no unit test gives {alert} a healthy series that must stay silent"


@pytest.mark.parametrize("alert", sorted(REQUIRED_ALERTS))
def test_unit_tests_fail_when_the_alert_is_broken(alert: str, tmp_path: Path) -> None:
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == alert:
                rule["expr"] = "vector(1) == 0"  # never fires
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(rules))
    unit = yaml.safe_load(UNIT_TESTS.read_text())
    unit["rule_files"] = [str(tmp_path / "alerts.yaml")]
    (tmp_path / "alerts_test.yaml").write_text(yaml.safe_dump(unit))
    result = _promtool("test", "rules", str(tmp_path / "alerts_test.yaml"))
    assert result.returncode != 0, f"the unit tests still pass with {alert} unable to fire"
    assert alert in result.stdout + result.stderr


def test_chart_ships_rules_promtool_accepts(tmp_path: Path) -> None:
    # The rules as the chart renders them, runbook URL swapped, must still be valid rules.
    rendered = subprocess.run(
        [
            tool("helm"), "template", "llm", str(CHART),
            "--set", "prometheusRule.enabled=true",
            "--set", "prometheusRule.runbookUrl=https://runbooks.example.com/gemmguard.md",
            "--show-only", "templates/prometheusrule.yaml",
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    spec = yaml.safe_load(rendered.stdout)["spec"]
    (tmp_path / "rendered.yaml").write_text(yaml.safe_dump(spec))
    result = _promtool("check", "rules", str(tmp_path / "rendered.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout
