"""End-to-end: the chart's alerts and dashboard against a real Prometheus scraping real servers.

One Prometheus (Debian's `prometheus`, installed by scripts/install-tools.sh) runs on loopback with
the rules `helm template` renders from the chart, every `for:` shortened through
prometheusRule.alertFor (the expressions are the chart's own). It scrapes five `gemmguard serve`
demo servers as a ServiceMonitor would, with `namespace` and `pod` target labels:

    healthy   defaults, a 2 s canary; no alert may fire on it, until its engine core is SIGSTOPped
              (GemmguardCanaryFailing) and it is restarted on the same state directory
              (GemmguardServerRestarted, and the canary failures survive the restart), then
              started on a new state directory, as a recreated pod of the same name would be
              (GemmguardPodRecreated, its counters from 0)
    warned    --selfcheck-policy warn; the faulty E8M0 kernel (degraded) chosen after the garbage
              kernel was --deny-kernel'ed
    unfixed   the bf16 demo with the portable-fp8 fix disabled: this CPU (no AMX) lacks it;
              loaded past the self-check (every layer unseen: an incomplete check)
    refused   --selfcheck-policy fail with the garbage kernel (broken): the refusal linger
    fallback  the default policy with the E8M0 kernel: replaced in place

The policy-dependent checks are tests of their own (test_*_policy_*).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
import yaml

from conftest import FAST_ENGINE_ARGS, START_TIMEOUT_S, Server, free_port, tool

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "gemmguard"
NAMESPACE = "e2e"
# The shortest `for:` the test gives an alert (the chart's own when it is shorter, e.g. 0m).
SHORT_FOR_S = 5
SCRAPE_S = 2
# How long the test waits for an alert at most: its `for:` plus scrapes and evaluations, with room
# for a 2-core machine running four engines.
ALERT_WAIT_S = 240
CANARY = ("--canary-interval", "2", "--canary-deadline", "4")
# Needs kube-state-metrics, which no test machine runs; promtool's unit tests cover it.
NEEDS_KUBERNETES = {"GemmguardNotReady"}


# --- the chart's rules --------------------------------------------------------------------------


def _duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h|d|w|y)", text))


def rendered_rules(tmp: Path) -> tuple[Path, set[str]]:
    """The PrometheusRule's groups as `helm template` renders them, `for:` shortened via values."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["prometheusRule"]["alertFor"]
    sets = []
    for alert, duration in defaults.items():
        if _duration_s(duration) > SHORT_FOR_S:
            sets += ["--set", f"prometheusRule.alertFor.{alert}={SHORT_FOR_S}s"]
    result = subprocess.run(
        [tool("helm"), "template", "llm", str(CHART), "--set", "prometheusRule.enabled=true",
         "--show-only", "templates/prometheusrule.yaml", *sets],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    spec = yaml.safe_load(result.stdout)["spec"]
    path = tmp / "rules.yaml"
    path.write_text(yaml.safe_dump(spec))
    alerts = {rule["alert"] for group in spec["groups"] for rule in group["rules"]}
    for group in spec["groups"]:
        for rule in group["rules"]:
            assert _duration_s(rule["for"]) <= SHORT_FOR_S, rule
    return path, alerts


# --- Prometheus -----------------------------------------------------------------------------------


@dataclass
class Prometheus:
    """A Prometheus process on loopback and its HTTP API."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    started: float = field(default_factory=time.time)

    def api(self, path: str, **params: Any) -> Any:
        response = requests.get(self.url + path, params=params, timeout=30)
        body = response.json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        return list(self.api("/api/v1/query", **params)["result"])

    def query_range(self, expr: str, seconds: int, step: int = SCRAPE_S) -> list[dict[str, Any]]:
        end = time.time()
        return list(self.api("/api/v1/query_range", query=expr, start=end - seconds, end=end,
                             step=step)["result"])

    def alerts(self, pod: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        """Active alerts (pending and firing), of one pod and state if given."""
        return [a for a in self.api("/api/v1/alerts")["alerts"]
                if (pod is None or a["labels"].get("pod") == pod)
                and (state is None or a["state"] == state)]

    def firing(self, pod: str) -> dict[str, list[dict[str, str]]]:
        """Firing alerts of a pod: alert name → label sets."""
        out: dict[str, list[dict[str, str]]] = {}
        for alert in self.alerts(pod, "firing"):
            out.setdefault(alert["labels"]["alertname"], []).append(alert["labels"])
        return out

    def wait_firing(self, pod: str, names: set[str],
                    where: Callable[[dict[str, list[dict[str, str]]]], bool] = lambda _: True,
                    timeout: float = ALERT_WAIT_S) -> dict[str, list[dict[str, str]]]:
        deadline = time.monotonic() + timeout
        firing: dict[str, list[dict[str, str]]] = {}
        while time.monotonic() < deadline:
            firing = self.firing(pod)
            if names <= set(firing) and where(firing):
                return firing
            time.sleep(1)
        raise AssertionError(
            f"{sorted(names - set(firing))} not firing for pod {pod} within {timeout:g} s; "
            f"firing: {sorted(firing)}; targets: {self.targets()}")

    def targets(self) -> list[tuple[str, str, str]]:
        data = self.api("/api/v1/targets")
        return [(t["labels"].get("pod", ""), t["health"], t.get("lastError", ""))
                for t in data["activeTargets"]]


def start_prometheus(tmp: Path, rules: Path, targets: dict[str, int]) -> Prometheus:
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "scrape_timeout": f"{SCRAPE_S}s",
                   "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{
            "job_name": "gemmguard",
            "static_configs": [
                {"targets": [f"127.0.0.1:{port}"], "labels": {"namespace": NAMESPACE, "pod": pod}}
                for pod, port in targets.items()
            ],
        }],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    check = subprocess.run([tool("promtool"), "check", "config", str(tmp / "prometheus.yml")],
                           capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    log_path = tmp / "prometheus.log"
    with log_path.open("wb") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
             "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    prometheus = Prometheus(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()[-3000:]
        try:
            if requests.get(prometheus.url + "/-/ready", timeout=2).status_code == 200:
                return prometheus
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError("Prometheus not ready in 120 s:\n" + log_path.read_text()[-3000:])


# --- the servers ----------------------------------------------------------------------------------


@dataclass
class Scenario:
    """How one server of the fleet is started, so that it can be started again."""

    args: tuple[str, ...]
    env: dict[str, str]
    port: int = field(default_factory=free_port)


def launch(name: str, scenario: Scenario, tmp: Path) -> Server:
    """Start `gemmguard serve` for a scenario on its fixed port; does not wait."""
    log_path = tmp / f"{name}-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-m", "gemmguard.cli", "serve", *scenario.args, *FAST_ENGINE_ARGS,
           "--host", "127.0.0.1", "--port", str(scenario.port)]
    with log_path.open("wb") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **scenario.env}, start_new_session=True)
    return Server(process, f"http://127.0.0.1:{scenario.port}", log_path)


def _answers(server: Server, path: str, status: int, text: str = "") -> bool:
    try:
        response = requests.get(server.base_url + path, timeout=5)
    except requests.RequestException:
        return False
    return response.status_code == status and text in response.text


def wait_until(server: Server, name: str, ready: Callable[[Server], bool],
               timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"{name} exited with {server.process.returncode} before it was "
                                 f"up:\n{server.log()[-6000:]}")
        if ready(server):
            return
        time.sleep(1)
    raise AssertionError(f"{name} not up in {timeout:g} s:\n{server.log()[-6000:]}")


def serving(server: Server) -> bool:
    return _answers(server, "/gemmguard/ready", 200)


def refusing(server: Server) -> bool:
    return _answers(server, "/metrics", 200, "gemmguard_selfcheck_refusals_total")


@dataclass
class Fleet:
    prometheus: Prometheus
    servers: dict[str, Server]
    scenarios: dict[str, Scenario]
    tmp: Path
    alerts: set[str]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, demo_cache: Path) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("prometheus-e2e")
    common = {"GEMMGUARD_CACHE_DIR": str(demo_cache)}

    def state(name: str) -> dict[str, str]:
        return {**common, "GEMMGUARD_STATE_DIR": str(tmp / f"{name}-state")}

    scenarios = {
        "healthy": Scenario(CANARY, state("healthy")),
        "warned": Scenario(
            ("--selfcheck-policy", "warn", "--deny-kernel", "GarbageFp8BlockKernel"),
            {**state("warned"), "GEMMGUARD_TEST_KERNELS": "garbage,e8m0"}),
        # Faulty test kernels would count as an FP8 block kernel here: bf16, none of them.
        "unfixed": Scenario(("--demo-scheme", "bf16", "--load-format", "gemmguard-test-bypass"),
                            {**state("unfixed"), "GEMMGUARD_FIXES_DISABLE": "portable-fp8",
                             "GEMMGUARD_TEST_LOADER": "bypass"}),
        "refused": Scenario(
            ("--selfcheck-policy", "fail", "--selfcheck-refusal-linger", "3600"),
            {**state("refused"), "GEMMGUARD_TEST_KERNELS": "garbage"}),
        "fallback": Scenario((), {**state("fallback"), "GEMMGUARD_TEST_KERNELS": "e8m0"}),
    }
    rules, alerts = rendered_rules(tmp)
    prometheus = start_prometheus(tmp, rules, {n: s.port for n, s in scenarios.items()})
    servers = {name: launch(name, scenario, tmp) for name, scenario in scenarios.items()}
    try:
        # All five load at once on a small machine: give them the start budget of two each.
        for name, server in servers.items():
            wait_until(server, name, refusing if name == "refused" else serving,
                       START_TIMEOUT_S * 2)
        yield Fleet(prometheus, servers, scenarios, tmp, alerts)
    finally:
        for server in servers.values():
            server.stop()
        os.killpg(prometheus.process.pid, signal.SIGTERM)
        prometheus.process.wait(timeout=60)


def _alertnames(firing: dict[str, list[dict[str, str]]]) -> set[str]:
    return set(firing)


# --- kernel decisions and engine fixes (no self-check policy involved) ----------------------------


def test_a_denied_kernel_alerts_as_a_fallback(fleet: Fleet) -> None:
    firing = fleet.prometheus.wait_firing("warned", {"GemmguardKernelFallback"})
    # Every fallback alert is one of gemmguard's own decisions, never vLLM's capability check.
    assert {a["reason"] for a in firing["GemmguardKernelFallback"]} == {"denied"}
    assert {a["preferred"] for a in firing["GemmguardKernelFallback"]} == {
        "GarbageFp8BlockKernel"}


def test_a_missing_engine_fix_alerts(fleet: Fleet) -> None:
    firing = fleet.prometheus.wait_firing("unfixed", {"GemmguardEngineFixMissing"})
    assert _alertnames(firing) <= {"GemmguardEngineFixMissing", "GemmguardSelfcheckIncomplete"}
    assert {a["fix"] for a in firing["GemmguardEngineFixMissing"]} == {"portable-fp8"}


def test_an_incomplete_check_serves_and_alerts_as_incomplete_not_failed(fleet: Fleet) -> None:
    """Every layer unseen (the bypassing loader), --selfcheck-unchecked warn: Ready, not passed."""
    firing = fleet.prometheus.wait_firing("unfixed", {"GemmguardSelfcheckIncomplete"})
    assert not {"GemmguardSelfcheckFailed", "GemmguardSelfcheckDegraded"} & set(firing)
    assert serving(fleet.servers["unfixed"]), "warn serves an incomplete check"
    assert fleet.prometheus.query('gemmguard_selfcheck_passed{pod="unfixed"} == 0')
    assert fleet.prometheus.query('gemmguard_selfcheck_complete{pod="unfixed"} == 0')
    report = fleet.servers["unfixed"].get("/gemmguard/v1/selfcheck").json()
    assert report["modules_held"] > 0 and report["modules_seen"] == 0
    assert report["counts"]["unchecked"] == report["modules_held"]


# --- each self-check policy ---------------------------------------------------------------------


def test_warn_policy_serves_and_alerts_on_the_degraded_kernel(fleet: Fleet) -> None:
    expected = {"GemmguardSelfcheckFailed", "GemmguardSelfcheckDegraded",
                "GemmguardKernelFallback"}
    firing = fleet.prometheus.wait_firing("warned", expected)
    assert _alertnames(firing) == expected
    assert serving(fleet.servers["warned"]), "warn serves the degraded kernel"


def test_fail_policy_refuses_and_alerts_from_the_refusing_server(fleet: Fleet) -> None:
    server = fleet.servers["refused"]
    firing = fleet.prometheus.wait_firing(
        "refused", {"GemmguardSelfcheckFailed", "GemmguardSelfcheckRefused"})
    assert _alertnames(firing) == {"GemmguardSelfcheckFailed", "GemmguardSelfcheckRefused"}
    report = server.get("/gemmguard/v1/selfcheck").json()
    assert report["passed"] is False and report["counts"]["broken"] > 0
    assert server.get("/gemmguard/ready").status_code == 503
    assert server.get("/v1/models").status_code == 404, "a refusing server serves no API"
    rejected = fleet.prometheus.query(
        'gemmguard_selfcheck_rejected_layers{pod="refused", kernel="GarbageFp8BlockKernel"}')
    assert rejected and float(rejected[0]["value"][1]) == report["counts"]["broken"]


def test_fallback_policy_replaces_the_kernel_and_alerts_as_a_fallback(fleet: Fleet) -> None:
    firing = fleet.prometheus.wait_firing(
        "fallback", {"GemmguardKernelFallback"},
        where=lambda f: any(a["reason"] == "selfcheck" for a in f["GemmguardKernelFallback"]))
    assert _alertnames(firing) == {"GemmguardKernelFallback"}, "no self-check alert: replaced"
    assert {a["preferred"] for a in firing["GemmguardKernelFallback"]} == {
        "E8M0RequantFp8BlockKernel"}
    rejected = fleet.prometheus.query('gemmguard_selfcheck_rejected_layers{pod="fallback"} > 0')
    assert {r["metric"]["kernel"] for r in rejected} == {"E8M0RequantFp8BlockKernel"}
    assert fleet.prometheus.query('gemmguard_selfcheck_passed{pod="fallback"} == 1')


# --- the healthy demo and the dashboard ---------------------------------------------------------


def test_no_alert_fires_on_the_healthy_demo(fleet: Fleet) -> None:
    prometheus = fleet.prometheus
    # Watch the healthy demo for a minute of scrapes, many times the longest `for:` given here.
    scrapes = 60 // SCRAPE_S
    deadline = time.monotonic() + ALERT_WAIT_S
    while time.monotonic() < deadline:
        window = int(time.time() - prometheus.started) + 60
        scraped = prometheus.query(
            f'count_over_time(gemmguard_selfcheck_passed{{pod="healthy"}}[{window}s])')
        if scraped and float(scraped[0]["value"][1]) >= scrapes:
            break
        time.sleep(2)
    assert scraped and float(scraped[0]["value"][1]) >= scrapes, prometheus.targets()
    ever = prometheus.query(f'count_over_time(ALERTS{{pod="healthy"}}[{window}s])')
    assert ever == [], f"alerts on the healthy demo: {[r['metric'] for r in ever]}"
    # vLLM's own capability rejections (this CPU has no AMX) are there, as information only.
    info = prometheus.query('gemmguard_kernel_fallback_total{pod="healthy", '
                            'reason!~"selfcheck|denied"}')
    assert info, "the healthy demo shows vLLM's capability rejections"


def _dashboard_targets() -> list[tuple[str, dict[str, Any]]]:
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    return [(panel["title"], target) for panel in dashboard["panels"]
            for target in panel.get("targets", [])]


def _label_values(prometheus: Prometheus, definition: str) -> list[str]:
    """Grafana's label_values(SELECTOR, LABEL) through Prometheus's label API."""
    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition)
    assert match, definition
    return list(prometheus.api(f"/api/v1/label/{match.group(2)}/values",
                               **{"match[]": match.group(1)}))


def test_every_dashboard_panel_returns_data(fleet: Fleet) -> None:
    prometheus = fleet.prometheus
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    namespaces = _label_values(prometheus, variables["namespace"]["definition"])
    assert NAMESPACE in namespaces
    chosen = {"namespace": NAMESPACE}
    pods = _label_values(
        prometheus, variables["pod"]["definition"].replace("$namespace", NAMESPACE))
    assert set(fleet.servers) <= set(pods), "every server, the refusing one too, is a pod option"
    # Grafana's "All" of a multi-value variable: the values joined as a regex alternation.
    chosen["pod"] = "(" + "|".join(sorted(pods)) + ")"
    # Canaries must have run for a rate interval so the latency quantiles have data.
    time.sleep(max(0.0, prometheus.started + 70 - time.time()))
    empty = []
    for title, target in _dashboard_targets():
        expr = target["expr"]
        for name, value in chosen.items():
            expr = expr.replace(f"${name}", value)
        expr = expr.replace("$__rate_interval", "1m")
        assert "$" not in expr, f"{title}: unresolved variable in {expr}"
        if target.get("instant"):
            values = [float(r["value"][1]) for r in prometheus.query(expr)]
        else:
            values = [float(v) for r in prometheus.query_range(expr, 60) for _, v in r["values"]]
        if not any(math.isfinite(v) for v in values):
            empty.append(f"{title}: {expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_the_release_smoke_test_passes_against_the_demo(fleet: Fleet) -> None:
    # The checks .github/workflows/release.yml runs on the CPU image before pushing, on the same
    # demo the image serves by default.
    result = subprocess.run(
        [str(ROOT / "scripts" / "smoke-image.sh"), "--url", fleet.servers["healthy"].base_url],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "one chat completion: 8 tokens" in result.stderr


# --- liveness: a hung engine, then a restart ------------------------------------------------------


def _engine_core(server: Server) -> psutil.Process:
    children = psutil.Process(server.process.pid).children(recursive=True)
    (core,) = [p for p in children if "EngineCore" in p.name()]
    return core


def _canary_timeouts(prometheus: Prometheus) -> float:
    result = prometheus.query(
        'gemmguard_canary_failures_total{pod="healthy", reason="timeout"}')
    return float(result[0]["value"][1]) if result else 0.0


def test_a_stopped_engine_pages_through_the_canary_counter(fleet: Fleet) -> None:
    core = _engine_core(fleet.servers["healthy"])
    os.kill(core.pid, signal.SIGSTOP)
    try:
        firing = fleet.prometheus.wait_firing("healthy", {"GemmguardCanaryFailing"})
    finally:
        os.kill(core.pid, signal.SIGCONT)
    assert _alertnames(firing) == {"GemmguardCanaryFailing"}
    assert _canary_timeouts(fleet.prometheus) >= 1


def test_canary_failures_survive_a_restart_and_the_restart_pages(fleet: Fleet) -> None:
    prometheus = fleet.prometheus
    before = _canary_timeouts(prometheus)
    assert before >= 1, "runs after the stopped-engine test"
    fleet.servers["healthy"].stop()
    # The same port (the same Prometheus target) and state directory: a container restart.
    server = launch("healthy", fleet.scenarios["healthy"], fleet.tmp)
    fleet.servers["healthy"] = server
    wait_until(server, "healthy (restarted)", serving, START_TIMEOUT_S)
    firing = prometheus.wait_firing("healthy", {"GemmguardServerRestarted",
                                                "GemmguardCanaryFailing"})
    assert _alertnames(firing) == {"GemmguardServerRestarted", "GemmguardCanaryFailing"}
    restored = [line for line in server.get("/metrics").text.splitlines()
                if line.startswith('gemmguard_canary_failures_total{reason="timeout"}')]
    assert restored and float(restored[0].split()[-1]) >= before


def test_a_pod_recreated_under_its_name_pages_although_its_counters_start_over(
        fleet: Fleet) -> None:
    # A LeaderWorkerSet group recreation: the same pod name (the same target here), a new pod
    # with an empty state directory. Its counters start from 0; the state's creation time tells.
    prometheus = fleet.prometheus
    assert _canary_timeouts(prometheus) >= 1, "runs after the canary tests"
    fleet.servers["healthy"].stop()
    scenario = fleet.scenarios["healthy"]
    recreated = Scenario(scenario.args, {**scenario.env, "GEMMGUARD_STATE_DIR":
                                         str(fleet.tmp / "healthy-recreated-state")},
                         port=scenario.port)
    server = launch("healthy", recreated, fleet.tmp)
    fleet.servers["healthy"] = server
    wait_until(server, "healthy (recreated)", serving, START_TIMEOUT_S)
    firing = prometheus.wait_firing("healthy", {"GemmguardPodRecreated"})
    assert "GemmguardPodRecreated" in firing
    lines = server.get("/metrics").text.splitlines()
    timeouts = [line for line in lines
                if line.startswith('gemmguard_canary_failures_total{reason="timeout"}')]
    assert timeouts and float(timeouts[0].split()[-1]) == 0, "a new pod's counters start at 0"


def test_every_alert_was_proven(fleet: Fleet) -> None:
    fired = {r["metric"]["alertname"] for r in fleet.prometheus.query(
        f'count_over_time(ALERTS{{alertstate="firing"}}'
        f'[{int(time.time() - fleet.prometheus.started) + 60}s])')}
    assert fleet.alerts - NEEDS_KUBERNETES <= fired, (
        f"never fired here: {sorted(fleet.alerts - NEEDS_KUBERNETES - fired)}")


def test_the_refusing_server_exits_3(fleet: Fleet) -> None:
    # Last: the linger ends (here by SIGTERM, as in a pod deletion) and the supervisor exits 3.
    process = fleet.servers["refused"].process
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 3
