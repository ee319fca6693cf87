"""The refusal linger: the self-check report on /metrics over real HTTP while the server refuses."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port
from gemmguard.config import settings
from gemmguard.refusal import REFUSALS, linger
from gemmguard.selfcheck.measure import LayerResult
from gemmguard.selfcheck.policy import Outcome


def _layer(name: str, verdict: str, excess: float | None, **extra: Any) -> dict[str, Any]:
    return {**LayerResult(name, "linear", "GarbageFp8BlockKernel", "fp8-block", verdict,
                          bits=1.0, expected_bits=10.0, excess_bits=excess).as_dict(), **extra}


# A `fail` refusal, as selfcheck.policy makes it: three layers pass, one is broken; the
# head's measurement is non-finite (never exported).
REPORT: dict[str, Any] = Outcome("fail", [{
    "rank": 0, "seconds": 0.8, "sample_bytes": 10, "model_bytes": 1000,
    "refusal": "1 layer(s) failed the self-check (policy fail)",
    "layers": [_layer("model.layers.0.mlp.down_proj", "broken", 9.5),
               _layer("model.layers.0.mlp.gate_up_proj", "pass", 0.01),
               _layer("model.layers.0.self_attn.qkv_proj", "pass", 0.02),
               _layer("lm_head", "pass", None)]}]).as_dict()


def _wait_up(url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=2)
            return
        except requests.ConnectionError:
            time.sleep(0.2)
    raise AssertionError(f"nothing answered on {url} within 60 s")


@pytest.fixture
def refusing(tmp_path: Path) -> Iterator[str]:
    """A linger running in a thread of this process; stopped at the end of the test."""
    port = free_port()
    stop = threading.Event()
    env = {"GEMMGUARD_SELFCHECK_REFUSAL_LINGER": "600", "GEMMGUARD_STATE_DIR": str(tmp_path)}
    thread = threading.Thread(target=linger,
                              args=(REPORT, "127.0.0.1", port, settings(env), stop))
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_up(base + "/metrics")
        yield base
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    with pytest.raises(requests.ConnectionError):
        requests.get(base + "/metrics", timeout=2)


def _samples(text: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def test_metrics_carry_the_report(refusing: str) -> None:
    response = requests.get(refusing + "/metrics", timeout=10)
    assert response.status_code == 200
    samples = _samples(response.text)
    assert [s.value for s in samples["gemmguard_selfcheck_passed"]] == [0]
    assert [s.value for s in samples["gemmguard_selfcheck_complete"]] == [1]
    layers = {s.labels["result"]: s.value for s in samples["gemmguard_selfcheck_layers"]}
    assert layers == {"pass": 3, "degraded": 0, "broken": 1, "unchecked": 0}
    (rejected,) = samples["gemmguard_selfcheck_rejected_layers"]
    assert rejected.labels == {"kernel": "GarbageFp8BlockKernel", "result": "broken"}
    assert rejected.value == 1
    excess = {s.labels["layer"]: s.value for s in samples["gemmguard_selfcheck_excess_bits"]}
    assert excess == {"model.layers.0.mlp.down_proj": 9.5,
                      "model.layers.0.mlp.gate_up_proj": 0.01,
                      "model.layers.0.self_attn.qkv_proj": 0.02}
    assert [s.value for s in samples[REFUSALS]] == [1]
    # Nothing else of the serving server: no vLLM series, no canary, no kernels.
    assert not [name for name in samples if name.startswith(("vllm", "gemmguard_canary"))]


def test_openmetrics_is_served_when_asked_for(refusing: str) -> None:
    response = requests.get(refusing + "/metrics", timeout=10,
                            headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


def test_the_report_and_the_probes(refusing: str) -> None:
    assert requests.get(refusing + "/gemmguard/v1/selfcheck", timeout=10).json() == REPORT
    for path in ("/gemmguard/ready", "/gemmguard/live"):
        response = requests.get(refusing + path, timeout=10)
        assert response.status_code == 503
        assert REPORT["summary"] in response.json()["reason"]
    for path in ("/health", "/v1/models", "/gemmguard/v1/kernels", "/"):
        assert requests.get(refusing + path, timeout=10).status_code == 404


def test_refusals_count_across_restarts_in_the_state_dir(tmp_path: Path) -> None:
    env = {"GEMMGUARD_SELFCHECK_REFUSAL_LINGER": "600", "GEMMGUARD_STATE_DIR": str(tmp_path)}
    for expected in (1, 2):
        port, stop = free_port(), threading.Event()
        thread = threading.Thread(target=linger,
                                  args=(REPORT, "127.0.0.1", port, settings(env), stop))
        thread.start()
        try:
            _wait_up(f"http://127.0.0.1:{port}/metrics")
            text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        finally:
            stop.set()
            thread.join(timeout=30)
        assert [s.value for s in _samples(text)[REFUSALS]] == [expected]


LINGER = """
import json, sys
from gemmguard.config import settings
from gemmguard.refusal import linger
linger(json.loads(sys.argv[1]), "127.0.0.1", int(sys.argv[2]),
       settings({"GEMMGUARD_SELFCHECK_REFUSAL_LINGER": sys.argv[3]}))
print("linger over", flush=True)
"""


def _linger_process(seconds: str) -> tuple[subprocess.Popen[str], str]:
    import json

    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", LINGER, json.dumps(REPORT), str(port),
                                seconds], stdout=subprocess.PIPE, text=True)
    return process, f"http://127.0.0.1:{port}"


def test_the_linger_ends_by_itself() -> None:
    process, base = _linger_process("3")
    _wait_up(base + "/metrics")
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0 and "linger over" in out


def test_sigterm_ends_the_linger_at_once() -> None:
    process, base = _linger_process("600")
    _wait_up(base + "/metrics")
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0 and "linger over" in out


def test_no_linger_serves_nothing() -> None:
    port = free_port()
    linger(REPORT, "127.0.0.1", port, settings({}))  # 0, the default: returns without serving
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_serve_option_sets_the_linger_and_rejects_a_negative_one() -> None:
    from gemmguard.errors import ConfigError
    from gemmguard.serve_plan import plan_serve

    port = str(free_port())
    plan = plan_serve(["--selfcheck-refusal-linger", "600", "--port", port], environ={})
    assert settings(plan.env).selfcheck_refusal_linger == 600
    with pytest.raises(ConfigError, match="GEMMGUARD_SELFCHECK_REFUSAL_LINGER"):
        plan_serve(["--selfcheck-refusal-linger", "-1", "--port", port], environ={})


def test_a_fallback_without_a_passing_candidate_names_the_rejected_kernel() -> None:
    from prometheus_client import generate_latest

    from gemmguard.refusal import refusal_registry

    layer = _layer("model.layers.1.mlp.down_proj", "degraded", 0.6,
                   kernel="E8M0RequantFp8BlockKernel",
                   replacement={"rejected": "E8M0RequantFp8BlockKernel",
                                "rejected_verdict": "degraded", "candidates": []})
    report = Outcome("fallback", [{**REPORT["ranks"][0], "layers": [layer]}]).as_dict()
    registry = refusal_registry(report, settings({}))
    (rejected,) = _samples(generate_latest(registry).decode())[
        "gemmguard_selfcheck_rejected_layers"]
    assert rejected.labels == {"kernel": "E8M0RequantFp8BlockKernel", "result": "degraded"}


def test_the_refusing_and_the_serving_server_export_the_same_selfcheck_series() -> None:
    """One exporter (issue 23): both scrapes of one report are equal, help text included."""
    from prometheus_client import CollectorRegistry, generate_latest

    from gemmguard.metrics import Metrics
    from gemmguard.refusal import refusal_registry

    def selfcheck_series(registry: CollectorRegistry) -> list[str]:
        return [line for line in generate_latest(registry).decode().splitlines()
                if "gemmguard_selfcheck_" in line and "selfcheck_refusals" not in line]

    for report in (REPORT, Outcome("warn", [{**REPORT["ranks"][0], "refusal": ""}]).as_dict()):
        registry = CollectorRegistry()
        Metrics(registry=registry).publish_selfcheck(Outcome.of_report(report))
        refusing = selfcheck_series(refusal_registry(report, settings({})))
        assert refusing == selfcheck_series(registry)
        assert any(line.startswith("gemmguard_selfcheck_rejected_layers{") for line in refusing) \
            is (report["policy"] != "warn")
