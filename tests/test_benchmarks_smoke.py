"""Smoke: the whole benchmark, end to end with tiny counts, against two real servers.

Timings are never asserted: only that every section ran, every ratio exists and is finite,
and every request was answered.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--requests", "4", "--concurrency", "1,2", "--rounds", "1", "--startup-rounds", "0",
        "--skip-large", "--skip-fp8", "--kernel-tokens", "1", "--kernel-repeats", "1",
        "--max-tokens", "8"]


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--out", str(out), "--workdir", str(out / "work"),
         *TINY], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-6000:]}"
    assert "gemmguard benchmark summary" in done.stdout
    data: dict[str, Any] = json.loads((out / "benchmarks.json").read_text())
    data["_markdown"] = (out / "benchmarks.md").read_text()
    return data


def test_tiny_benchmark_runs_end_to_end(results: dict[str, Any]) -> None:
    assert results["problems"] == []
    assert results["_markdown"].startswith("# Benchmarks")
    assert results["command"] in results["_markdown"]

    path = results["request_path"]
    assert path["servers"]["plain"]["gemmguard_visible"] is False
    assert path["servers"]["gemmguard"]["gemmguard_visible"] is True
    assert [(c["concurrency"], c["stream"]) for c in path["cells"]] == [
        (1, False), (1, True), (2, False), (2, True)]
    for cell in path["cells"]:
        for metric in ("requests_per_s", "output_tokens_per_s", "latency_p50_s",
                       "latency_p95_s"):
            assert finite(cell["ratio"][metric]["median"]), (cell, metric)
        if cell["stream"]:
            assert finite(cell["ratio"]["ttft_p50_s"]["median"])
            assert finite(cell["plain"]["first_chunk_at_end"]["median"])

    held = results["load_held"]
    assert held["held"] is True
    for totals in held["servers"].values():
        assert totals["sent"] == totals["answered"] > 0
        assert totals["http_5xx"] == totals["lost"] == totals["short"] == 0

    [demo] = results["startup"]["models"]
    assert demo["model"] == "demo-bf16" and finite(demo["ratio"])
    assert demo["selfcheck_passed"] is True and finite(demo["selfcheck_share"]["median"])
    assert demo["sample_bytes"] > 0

    memory = results["memory"]["rows"][0]
    assert finite(memory["rss_ratio"]) and finite(memory["pss_ratio"])
    assert memory["gemmguard_by_role"].get("supervisor", 0) > 0

    rows = results["kernels"]["rows"]
    assert rows and all(finite(r["ratio_vs_bf16"][k]) for r in rows for k in r["ratio_vs_bf16"])
