"""End-to-end: each self-check policy against a served demo model with a faulty kernel forced."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import FAST_ENGINE_ARGS, Server, free_port

pytestmark = pytest.mark.e2e

E8M0 = "E8M0RequantFp8BlockKernel"


def _samples(server: Server, name: str) -> list:  # type: ignore[type-arg]
    families = text_string_to_metric_families(server.get("/metrics").text)
    return [s for f in families for s in f.samples if s.name == name]


def _value(server: Server, name: str, **labels: str) -> float:
    (sample,) = [s for s in _samples(server, name) if labels.items() <= s.labels.items()]
    return float(sample.value)


def _completes(server: Server) -> bool:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    reply = client.completions.create(model="gemmguard-demo", prompt="hi", max_tokens=3,
                                      extra_body={"ignore_eos": True})
    return reply.usage is not None and reply.usage.completion_tokens == 3


@pytest.fixture(scope="module")
def warned(server_factory: Callable[..., Server]) -> Server:
    return server_factory("--selfcheck-policy", "warn", env={"GEMMGUARD_TEST_KERNELS": "e8m0"})


@pytest.fixture(scope="module")
def fell_back(server_factory: Callable[..., Server]) -> Server:
    # Default policy (fallback): the kernel is replaced inside the one engine start.
    return server_factory(env={"GEMMGUARD_TEST_KERNELS": "e8m0"})


def test_warn_serves_and_says_degraded(warned: Server) -> None:
    ready = warned.get("/gemmguard/ready")
    assert ready.status_code == 200 and ready.json()["selfcheck_passed"] is False
    report = warned.get("/gemmguard/v1/selfcheck").json()
    degraded = [row for row in report["ranks"][0]["layers"] if row["verdict"] == "degraded"]
    assert degraded and {row["kernel"] for row in degraded} == {E8M0}
    assert all(row["excess_bits"] > 0.25 for row in degraded)
    assert _value(warned, "gemmguard_selfcheck_passed") == 0
    assert _value(warned, "gemmguard_selfcheck_layers", result="degraded") == len(degraded)
    excess = [s for s in _samples(warned, "gemmguard_selfcheck_excess_bits")
              if s.labels["kernel"] == E8M0]
    assert len(excess) == len(degraded) and min(s.value for s in excess) > 0.25
    assert "degraded" in warned.log()
    assert _completes(warned)


def test_fallback_replaces_in_place_with_one_engine_start(fell_back: Server) -> None:
    report = fell_back.get("/gemmguard/v1/selfcheck").json()
    assert report["passed"] is True and report["complete"] is True
    replaced = report["replacements"]
    fp8_layers = [row for row in report["ranks"][0]["layers"] if row["scheme"] == "fp8-block"]
    assert len(replaced) == len(fp8_layers) > 0
    for item in replaced:
        assert item["rejected"] == E8M0 and item["rejected_verdict"] == "degraded"
        assert item["kernel"] and item["kernel"] != E8M0
        assert item["cost_ratio"] > 0  # measured at load on the layer's shape
    kernels = fell_back.get("/gemmguard/v1/kernels").json()["ranks"][0]["layers"]
    fp8 = {row["kernel"] for row in kernels if row["scheme"] == "fp8-block"}
    assert fp8 and E8M0 not in fp8
    selfcheck_fallbacks = [s for s in _samples(fell_back, "gemmguard_kernel_fallback_total")
                           if s.labels["reason"] == "selfcheck"]
    assert {s.labels["preferred"] for s in selfcheck_fallbacks} == {E8M0}
    assert {s.labels["chosen"] for s in selfcheck_fallbacks} == fp8
    assert _value(fell_back, "gemmguard_selfcheck_passed") == 1
    assert _value(fell_back, "gemmguard_selfcheck_rejected_layers", kernel=E8M0,
                  result="degraded") == len(replaced)
    (cost,) = [s for s in _samples(fell_back, "gemmguard_selfcheck_replacement_cost_ratio")
               if s.labels["rejected"] == E8M0]
    assert cost.value > 0
    assert "replaced by" in fell_back.log()
    assert fell_back.log().count("Loaded endpoint plugin gemmguard_api") == 1  # one start
    assert _completes(fell_back)


def test_fail_exits_with_a_report_that_names_layers_kernels_bits_and_the_way_out(
    tmp_path: Path, demo_cache: Path
) -> None:
    env = {**os.environ, "GEMMGUARD_TEST_KERNELS": "corrupt-block",
           "GEMMGUARD_CACHE_DIR": str(demo_cache)}
    result = subprocess.run(
        [sys.executable, "-m", "gemmguard.cli", "serve", "--selfcheck-policy", "fail",
         "--host", "127.0.0.1", "--port", str(free_port()), *FAST_ENGINE_ARGS],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert "broken   model.layers.0.mlp.down_proj: CorruptBlockFp8BlockKernel gives" in (
        result.stderr)
    assert "bits where the fp8-block scheme allows" in result.stderr
    assert "--deny-kernel CorruptBlockFp8BlockKernel" in result.stderr
