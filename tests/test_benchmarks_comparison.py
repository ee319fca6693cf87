"""benchmarks.comparison reads what `vllm bench serve` really writes: real runs, one demo model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from benchmarks import comparison
from benchmarks.cli import build_parser
from benchmarks.rounds import Load

from conftest import Server

pytestmark = pytest.mark.e2e

ARMS = ("plain", "gemmguard", "plain-b")
LOAD = "tiny"


@pytest.fixture(scope="module")
def results(server_factory: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory
            ) -> Path:
    """Real `vllm bench serve` results against one demo server (every arm is the same one)."""
    server = server_factory("--demo-scheme", "bf16", "--no-canary")
    folder = tmp_path_factory.mktemp("results")
    model = server.get("/v1/models").json()["data"][0]
    # The command line scripts/gpu-bench.sh runs: one round, three arms.
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.rounds", "--results", str(folder),
         "--tokenizer", model["root"], "--served-model-name", model["id"],
         *[f"--arm={arm}={server.base_url}" for arm in ARMS],
         "--load", f"{LOAD}:16:8:2:6", "--rounds", "1"],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return folder


def _raw(folder: Path, arm: str) -> dict[str, float]:
    return json.loads((folder / f"{LOAD}-r1-{arm}.json").read_text())  # type: ignore[no-any-return]


def test_vllm_writes_every_field_the_comparison_reads(results: Path) -> None:
    for arm in ARMS:
        raw = _raw(results, arm)
        assert (raw["ab_arm"], raw["ab_load"], raw["ab_round"]) == (arm, LOAD, "1")
        for field, _, _ in comparison.METRICS:
            assert raw[field] > 0, field
        assert raw["num_prompts"] == 6 and raw["max_concurrency"] == 2
    runs = comparison.load_runs(results)
    assert len(runs) == len(ARMS) and all(run.complete for run in runs)


def test_ratios_are_over_the_plain_servers_of_their_round_in_vllms_numbers(results: Path) -> None:
    runs = comparison.load_runs(results)
    for field, _, _ in comparison.METRICS:
        plain, plain_b = _raw(results, "plain")[field], _raw(results, "plain-b")[field]
        assert comparison.round_ratios(runs, LOAD, "plain-b", field) == [plain_b / plain]
        assert comparison.round_ratios(runs, LOAD, "gemmguard", field) == [
            _raw(results, "gemmguard")[field] / ((plain + plain_b) / 2)]
    row = comparison.rows(runs)[0]
    assert row.metric == "output tok/s" and row.ab is not None and row.aa is not None
    assert row.ab.n == row.aa.n == 1
    text = comparison.markdown(results)
    assert f"| {LOAD} | output tok/s | {row.ab.text()} | {row.aa.text()} | 1, 1 |" in text
    assert "Every request of every run was answered." in text


def test_a_round_without_plain_is_left_out_and_said(results: Path, tmp_path: Path) -> None:
    for arm in ("gemmguard", "plain-b"):
        shutil.copy(results / f"{LOAD}-r1-{arm}.json", tmp_path)
    runs = comparison.load_runs(tmp_path)
    assert comparison.unpaired(runs) == [f"{LOAD} round 1 has gemmguard, plain-b"]
    assert {(row.ab, row.aa) for row in comparison.rows(runs)} == {(None, None)}
    assert f"| {LOAD} | output tok/s | no usable round | no usable round | 0, 0 |" in (
        comparison.markdown(tmp_path))
    assert comparison.main([str(tmp_path)]) == 1


def test_a_round_whose_plain_run_failed_requests_is_left_out(
    results: Path, tmp_path: Path
) -> None:
    for arm in ARMS:
        shutil.copy(results / f"{LOAD}-r1-{arm}.json", tmp_path)
    plain = tmp_path / f"{LOAD}-r1-plain.json"
    raw = json.loads(plain.read_text())
    raw["completed"], raw["failed"] = raw["completed"] - 1, 1  # as vLLM counts a failed request
    plain.write_text(json.dumps(raw))
    runs = comparison.load_runs(tmp_path)
    assert comparison.round_ratios(runs, LOAD, "plain-b", "output_throughput") == []
    assert comparison.unpaired(runs) == [
        f"{LOAD} round 1 has gemmguard, plain (incomplete), plain-b"]


def test_untagged_results_are_skipped_and_none_at_all_is_an_error(
    results: Path, tmp_path: Path
) -> None:
    raw = _raw(results, "plain")
    for key in ("ab_arm", "ab_load", "ab_round"):
        raw.pop(key)
    (tmp_path / "untagged.json").write_text(json.dumps(raw))
    with pytest.raises(comparison.ResultsError, match="carries ab_arm"):
        comparison.load_runs(tmp_path)


def test_startup_lines_compare_like_starts() -> None:
    lines = comparison.startup_lines([
        {"arm": "plain", "start": 1, "health_s": 80.0},
        {"arm": "gemmguard", "start": 1, "health_s": 84.0, "ready_s": 88.0},
        {"arm": "plain", "start": 2, "health_s": 40.0},
        {"arm": "gemmguard", "start": 2, "health_s": 41.0, "ready_s": 44.0},
    ])
    assert lines[-1] == ("Start-up gemmguard/plain: start 1: /health 1.050×, ready 1.100×; "
                         "start 2: /health 1.025×, ready 1.100×.")


def test_loads_are_parsed_and_bad_ones_explained() -> None:
    assert Load.parse("small:64:64:4:32") == Load("small", 64, 64, 4, 32)
    args = build_parser().parse_args(["--load", "a:1:2:3:4", "--rounds", "2"])
    assert args.load == [Load("a", 1, 2, 3, 4)] and args.rounds == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--load", "small:64:64"])
