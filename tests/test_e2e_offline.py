"""End-to-end: `gemmguard kernels` and `gemmguard selfcheck` load a model offline (no server)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gemmguard.demo import write_demo_model

pytestmark = pytest.mark.e2e

ENGINE = ["--enforce-eager", "--max-model-len", "512"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("offline") / "fp8", "fp8-block")


def _gemmguard(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gemmguard.cli", *args],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def test_kernels_json_names_every_layer_and_vllms_turned_down_candidates(model: Path) -> None:
    result = _gemmguard("kernels", str(model), "--json", *ENGINE)
    assert result.returncode == 0, result.stderr[-3000:]
    (rows,) = json.loads(result.stdout)  # stdout holds only the JSON: vLLM logs go to stderr
    fp8 = [row for row in rows if row["scheme"] == "fp8-block"]
    assert len(fp8) == 8  # 2 layers × (qkv, o, gate_up, down)
    for row in fp8:
        assert row["kernel"] and row["turned_down"]
        assert all(attempt["reason"] for attempt in row["turned_down"])


def test_selfcheck_exits_1_and_the_advice_it_prints_cures_the_model(model: Path) -> None:
    result = _gemmguard("selfcheck", str(model), *ENGINE, GEMMGUARD_TEST_KERNELS="garbage")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "0 degraded, 8 broken" in result.stdout
    assert "--deny-kernel GarbageFp8BlockKernel" in result.stdout
    # Follow the advice as a user would: the options after "gemmguard serve …", as printed.
    (advice,) = re.findall(r"Avoid these kernels with: gemmguard serve … (.+)", result.stdout)
    cured = _gemmguard("selfcheck", str(model), *ENGINE, *advice.split(),
                       GEMMGUARD_TEST_KERNELS="garbage")
    assert cured.returncode == 0, cured.stdout[-3000:] + cured.stderr[-3000:]
    (passed,) = re.findall(r"(\d+) passed, 0 degraded, 8 broken", result.stdout)
    assert f"{int(passed) + 8} passed, 0 degraded, 0 broken, 0 unchecked" in cured.stdout


def test_selfcheck_records_exactly_what_the_check_measured(model: Path, tmp_path: Path) -> None:
    """GEMMGUARD_RECORD_DIR keeps each layer's sample and kernel outputs; replayed here, they
    give the verdict and bits the engine's own check reported (the E8M0 test kernel: degraded)."""
    from gemmguard.selfcheck import recording

    result = _gemmguard("selfcheck", str(model), "--json", "--policy", "warn", *ENGINE,
                        GEMMGUARD_TEST_KERNELS="e8m0", GEMMGUARD_RECORD_DIR=str(tmp_path),
                        GEMMGUARD_RECORD_NAME="e8m0")
    assert result.returncode == 1, result.stderr[-3000:]
    (rank,) = json.loads(result.stdout)["ranks"]
    reported = {layer["layer"]: layer for layer in rank["layers"]}
    recordings = recording.load(tmp_path / f"e8m0.rank0{recording.SUFFIX}")
    assert {rec.layer for rec in recordings} == set(reported)
    assert {rec.seeds[-1] for rec in recordings} == {recording.RECORD_SEEDS[-1]}
    for rec in recordings:
        replayed = recording.replay(rec, 0)
        row = reported[rec.layer]
        assert (replayed.verdict, replayed.kernel) == (row["verdict"], row["kernel"])
        assert replayed.bits == pytest.approx(row["bits"], abs=2e-4)
        assert replayed.excess_bits == pytest.approx(row["excess_bits"], abs=2e-4)
    assert any(rec.verdict == "degraded" for rec in recordings)
