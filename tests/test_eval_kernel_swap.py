"""`gemmguard eval-kernels` end to end on the demo model, plus prompts and thresholds.

The kernel swap is real: the fp8-block demo model served as chosen, and served again with
`--deny-kernel <the chosen FP8 kernel>`, so vLLM falls back to its next candidate (on this CPU
the portable W8A16 dequantizing kernel gives way to the W8A8 emulating one, which quantizes
activations to FP8 as the scheme says). Both choices are read from /gemmguard/v1/kernels,
not assumed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import Server
from gemmguard.errors import UsageError
from gemmguard.evaluation.divergence import Summary
from gemmguard.evaluation.kernel_swap import (
    DEFAULT_PROMPTS,
    KernelSwapReport,
    Side,
    load_prompts,
)


def _fp8_kernels(server: Server) -> set[str]:
    body = server.get("/gemmguard/v1/kernels").json()
    return {row["kernel"] for rank in body["ranks"] for row in rank["layers"]
            if row["scheme"] == "fp8-block"}


@pytest.fixture(scope="module")
def default_server(shared_server: Callable[..., Server]) -> Server:
    return shared_server("--demo-scheme", "fp8-block")


@pytest.fixture(scope="module")
def swapped_server(shared_server: Callable[..., Server], default_server: Server) -> Server:
    (chosen,) = _fp8_kernels(default_server)
    server = shared_server("--demo-scheme", "fp8-block", "--deny-kernel", chosen)
    assert _fp8_kernels(server) and chosen not in _fp8_kernels(server)
    return server


def _eval_kernels(tmp_path: Path, *args: str) -> tuple[int, str, dict[str, Any]]:
    output = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "gemmguard.cli", "eval-kernels", *args, "--output", str(output)],
        capture_output=True, text=True, timeout=600,
    )
    assert output.exists(), done.stdout + done.stderr
    return done.returncode, done.stdout, json.loads(output.read_text())


def test_default_prompts_are_a_dozen_short_ones() -> None:
    assert len(DEFAULT_PROMPTS) == 12 and len(set(DEFAULT_PROMPTS)) == 12
    assert all(0 < len(p) <= 64 for p in DEFAULT_PROMPTS)


def test_prompts_load_from_lines_or_a_json_list(tmp_path: Path) -> None:
    lines = tmp_path / "p.txt"
    lines.write_text("first prompt\n\nsecond prompt\n")
    assert load_prompts(lines) == ("first prompt", "second prompt")
    listed = tmp_path / "p.json"
    listed.write_text(json.dumps(["multi\nline", "two"]))
    assert load_prompts(listed) == ("multi\nline", "two")
    listed.write_text(json.dumps({"prompt": "x"}))
    with pytest.raises(UsageError, match=r"must hold a JSON list of strings"):
        load_prompts(listed)
    with pytest.raises(UsageError, match=r"Cannot read prompts file"):
        load_prompts(tmp_path / "missing.txt")


@pytest.mark.e2e
def test_same_kernels_agree_fully_with_zero_kl(default_server: Server, tmp_path: Path) -> None:
    rc, stdout, report = _eval_kernels(
        tmp_path, "--base-url", default_server.base_url,
        "--reference-url", default_server.base_url, "--min-agreement", "1.0",
    )
    assert rc == 0, stdout
    summary = report["summary"]
    assert summary["agreement"] == 1.0
    assert summary["identical_prompts"] == summary["prompts"] == 12
    assert summary["earliest_divergence"] is None
    assert summary["mean_kl"] == 0.0 and summary["max_kl"] == 0.0
    # Every generated position was compared, with the requested top-k at each.
    assert summary["kl_positions"] == summary["positions"] > 12
    first = report["prompts"][0]
    assert first["candidate_tokens"] == first["reference_tokens"]
    assert all(t.startswith("token_id:") for t in first["candidate_tokens"])
    assert report["verdict"] == "pass" and stdout.splitlines()[-2].startswith("PASS:")


@pytest.mark.e2e
def test_swapped_kernel_diverges_with_positive_kl(
    default_server: Server, swapped_server: Server, tmp_path: Path
) -> None:
    rc, stdout, report = _eval_kernels(
        tmp_path, "--base-url", default_server.base_url,
        "--reference-url", swapped_server.base_url, "--max-tokens", "32", "--top-logprobs", "10",
        "--min-agreement", "1.0",
    )
    assert rc == 1, stdout
    assert report["verdict"] == "fail"
    assert report["failures"][0].startswith("token agreement ")
    assert stdout.splitlines()[-2].startswith("FAIL: token agreement ")
    summary = report["summary"]
    assert summary["agreement"] < 1.0
    assert summary["earliest_divergence"] is not None
    assert summary["mean_kl"] > 0.0 and summary["max_kl"] > 0.0
    assert report["settings"]["top_logprobs"] == 10
    kernels = [report[side]["kernels"]["fp8-block"] for side in ("candidate", "reference")]
    assert kernels[0] != kernels[1]
    for prompt in report["prompts"]:
        cand, ref = prompt["candidate_tokens"], prompt["reference_tokens"]
        at = prompt["first_divergence"]
        if at is None:
            assert cand == ref
        else:
            assert cand[:at] == ref[:at] and cand[at:at + 1] != ref[at:at + 1]
            assert len(prompt["kl"]) == min(at + 1, len(cand), len(ref))


def _report(agreement: float, mean_kl: float, max_mean_kl: float | None) -> KernelSwapReport:
    summary = Summary(prompts=1, identical_prompts=0, matched=0, positions=0,
                      agreement=agreement, mean_kl=mean_kl, max_kl=mean_kl, kl_positions=1,
                      mean_top_k_overlap=1.0, earliest_divergence=0)
    side = Side("http://x", "m", None)
    return KernelSwapReport(side, side, ("p",), 8, 5, (), summary, 0.9, max_mean_kl)


def test_thresholds_decide_the_verdict() -> None:
    assert _report(0.95, 0.5, None).passed
    assert _report(0.85, 0.0, None).failures == ["token agreement 0.8500 < 0.9 (--min-agreement)"]
    assert _report(0.95, 0.02, 0.01).failures == [
        "mean KL 0.02 nats > 0.01 (--max-mean-kl)"
    ]
    assert _report(0.95, 0.01, 0.01).passed
