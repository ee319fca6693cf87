"""End-to-end: every GEMM the model holds has one row; an incomplete check is never passed.

Real engine starts of the demo checkpoints:
- a loader that post-processes the weights past the check (`gemmguard.vllm_adapter.bypass_loader`,
  as vLLM's GGUF and weight-cache loaders do): every GEMM `unchecked`, not seen by the check;
  offline under --selfcheck-unchecked allow (exit 0, still not passed), and served under fail
  (the API server refuses: exit 3 with the report);
- a checkpoint with a layer whose weights are all zero (reference and output both zero: the
  `unchecked` verdict of a layer the check saw) and a faulty MoE experts kernel, checked
  offline under policy fallback and --selfcheck-unchecked fail: the experts are replaced in
  place, the unchecked layer refuses, and the refusal prints its JSON report and exits 3,
  without a traceback of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import FAST_ENGINE_ARGS, START_TIMEOUT_S, free_port
from gemmguard.demo import write_demo_model
from gemmguard.vllm_adapter.bypass_loader import LOAD_FORMAT

pytestmark = pytest.mark.e2e

BYPASS = {"GEMMGUARD_TEST_LOADER": "bypass"}
ZEROED = "model.layers.0.self_attn.o_proj"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("coverage") / "fp8", "fp8-block")


def _gemmguard(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gemmguard.cli", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})


def test_a_loader_that_bypasses_the_check_leaves_every_gemm_unseen(model: Path) -> None:
    result = _gemmguard("selfcheck", str(model), "--json", "--selfcheck-unchecked", "allow",
                        "--load-format", LOAD_FORMAT, *FAST_ENGINE_ARGS, **BYPASS)
    assert result.returncode == 0, result.stderr[-3000:]  # allowed, but not passed
    report = json.loads(result.stdout)
    assert report["passed"] is False and report["complete"] is False
    assert report["action"] == "serve-incomplete"
    (rank,) = report["ranks"]
    layers = rank["layers"]
    # Every GEMM-owning module the model holds: 2 layers × (qkv, o, gate_up, down) + lm_head.
    assert len(layers) == 9 == report["modules_held"]
    assert (report["modules_seen"], report["modules_checked"]) == (0, 0)
    assert {row["verdict"] for row in layers} == {"unchecked"}
    assert {row["seen"] for row in layers} == {False}
    assert {row["reason"] for row in layers} == {
        f"not seen by the check (loader {LOAD_FORMAT})"}
    assert "9 of them not seen by the check" in report["summary"]
    # The inventory still names each kernel: the model runs them, unchecked.
    assert all(row["kernel"] and row["scheme"] for row in layers)


def test_the_default_loader_is_reconciled_to_one_checked_row_per_gemm(model: Path) -> None:
    result = _gemmguard("selfcheck", str(model), "--json", *FAST_ENGINE_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    (rank,) = report["ranks"]
    names = [row["layer"] for row in rank["layers"]]
    assert len(names) == len(set(names)) == 9
    assert (report["modules_held"], report["modules_seen"], report["modules_checked"]) == (9, 9, 9)
    assert report["passed"] is True and report["complete"] is True


def test_serve_refuses_a_model_the_check_never_saw_under_unchecked_fail(
        model: Path, tmp_path: Path) -> None:
    port = str(free_port())
    result = _gemmguard("serve", str(model), "--selfcheck-unchecked", "fail", "--load-format",
                        LOAD_FORMAT, *FAST_ENGINE_ARGS, "--host", "127.0.0.1", "--port", port,
                        timeout=START_TIMEOUT_S, **BYPASS,
                        GEMMGUARD_CACHE_DIR=str(tmp_path))
    assert result.returncode == 3, (result.stdout + result.stderr)[-6000:]
    assert "INCOMPLETE: 9 unchecked, 9 of them not seen by the check" in result.stderr
    assert "could not be checked (--selfcheck-unchecked fail)" in result.stderr


@pytest.fixture(scope="module")
def moe_with_a_zero_layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MoE demo, one attention projection pruned to zeros (its weights say nothing)."""
    path = write_demo_model(tmp_path_factory.mktemp("zeroed") / "moe", "bf16", arch="qwen3-moe")
    weights = path / "model.safetensors"
    tensors = load_file(str(weights))
    tensors[f"{ZEROED}.weight"].zero_()
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return path


def test_offline_fallback_refusal_prints_its_report_and_exits_3(
        moe_with_a_zero_layer: Path) -> None:
    result = _gemmguard("selfcheck", str(moe_with_a_zero_layer), "--json", "--policy",
                        "fallback", "--selfcheck-unchecked", "fail", *FAST_ENGINE_ARGS,
                        GEMMGUARD_TEST_KERNELS="moe-garbage")
    assert result.returncode == 3, result.stderr[-3000:]
    # gemmguard's own process ends with the report, not a traceback through the CLI; vLLM's
    # worker and engine-core processes still print the refusal's exception as they exit.
    assert "gemmguard/cli.py" not in result.stderr
    report = json.loads(result.stdout)  # stdout holds only the JSON
    assert report["action"] == "refuse" and report["passed"] is False
    assert "could not be checked (--selfcheck-unchecked fail)" in report["refusal"]
    rows = {row["layer"]: row for rank in report["ranks"] for row in rank["layers"]}
    zeroed = rows[ZEROED]
    assert (zeroed["verdict"], zeroed["reason"], zeroed["seen"]) == (
        "unchecked", "reference is zero", True)
    # The faulty experts were replaced in place before the refusal (policy fallback).
    moe = [row for row in rows.values() if row["layer_type"] == "moe"]
    assert moe and all(row["verdict"] == "pass" for row in moe)
    assert {row["replacement"]["rejected"] for row in moe} == {"GarbageCPUExperts"}
