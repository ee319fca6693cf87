"""The one-sided rule, the verdict screen and the JSON record, on hand-made lm-eval results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gemmguard.evaluation.config import load_config, parse_config
from gemmguard.evaluation.verdict import compact_samples, judge, render, result_document

EVALS = Path(__file__).resolve().parent.parent / "evals"
BLACKWELL = load_config(EVALS / "Qwen3.5-35B-A3B-FP8-cuda-blackwell.yaml")


def _results(flexible: float | None, strict: float = 0.5) -> dict[str, Any]:
    values: dict[str, Any] = {"exact_match,strict-match": strict,
                              "exact_match_stderr,strict-match": 0.013}
    if flexible is not None:
        values |= {"exact_match,flexible-extract": flexible,
                   "exact_match_stderr,flexible-extract": 0.011}
    return {"gsm8k_local": values}


@pytest.mark.parametrize(
    "measured,passed",
    [(0.81, True), (0.83, True), (0.81 * 0.95, True), (0.7694, False), (0.6917, False)],
    ids=["expected", "above", "at the bar", "just below", "deepgemm e8m0 regression"],
)
def test_one_sided_rule(measured: float, passed: bool) -> None:
    verdict = judge(BLACKWELL, _results(measured))
    assert verdict.passed is passed
    (check,) = verdict.checks
    assert check.threshold == pytest.approx(0.81 * (1 - 0.05))
    assert (check.measured, check.stderr, check.expected) == (measured, 0.011, 0.81)


def test_missing_metric_fails() -> None:
    verdict = judge(BLACKWELL, _results(None))
    assert not verdict.passed and verdict.failed[0].measured is None
    assert not judge(BLACKWELL, {}).passed


def test_zero_expectation_passes_any_score() -> None:
    config = parse_config({
        "model_name": "m", "hardware": "cpu", "rtol": 0.0, "num_fewshot": 0,
        "tasks": [{"name": "gsm8k_local",
                   "metrics": [{"name": "exact_match,strict-match", "value": 0.0}]}],
        "source": {"kind": "placeholder", "reference": "x"},
    })
    assert judge(config, _results(None, strict=0.0)).passed


def _lm_results(flexible: float) -> dict[str, Any]:
    return {
        "results": _results(flexible),
        "n-samples": {"gsm8k_local": {"original": 1319, "effective": 1319}},
        "lm_eval_version": "0.4.13",
        "samples": {"gsm8k_local": [
            {"doc_id": 1, "target": "#### 3", "resps": [["x 3"]], "filtered_resps": ["[invalid]"],
             "filter": "strict-match", "metrics": ["exact_match"], "exact_match": 0.0},
            {"doc_id": 0, "target": "#### 18", "resps": [["#### 18"]], "filtered_resps": ["18"],
             "filter": "strict-match", "metrics": ["exact_match"], "exact_match": 1.0},
            {"doc_id": 1, "target": "#### 3", "resps": [["x 3"]], "filtered_resps": ["3"],
             "filter": "flexible-extract", "metrics": ["exact_match"], "exact_match": 1.0},
        ]},
    }


RUN = {"base_url": "http://127.0.0.1:8000", "model": "Qwen/Qwen3.5-35B-A3B-FP8",
       "model_type": "local-completions", "duration_s": 812.0, "server": "", "notes": []}


def test_samples_fold_into_one_record_per_doc() -> None:
    folded = compact_samples(_lm_results(0.8)["samples"])["gsm8k_local"]
    assert [d["doc_id"] for d in folded] == [0, 1]
    assert folded[1] == {
        "doc_id": 1, "target": "#### 3", "response": "x 3",
        "filters": {"strict-match": {"extracted": "[invalid]", "exact_match": 0.0},
                    "flexible-extract": {"extracted": "3", "exact_match": 1.0}},
    }


def test_document_records_verdict_checks_and_provenance() -> None:
    lm = _lm_results(0.6917)
    verdict = judge(BLACKWELL, lm["results"])
    doc = result_document(BLACKWELL, verdict, lm, RUN)
    assert doc["verdict"] == "fail"
    assert doc["checks"][0]["metric"] == "exact_match,flexible-extract"
    assert doc["config"]["source"]["kind"] == "upstream"
    assert doc["metrics"]["gsm8k_local"]["exact_match,strict-match"] == 0.5
    assert doc["n_samples"]["gsm8k_local"]["effective"] == 1319


def test_screen_prints_every_metric_before_the_verdict() -> None:
    lm = _lm_results(0.6917)
    verdict = judge(BLACKWELL, lm["results"])
    screen = render(BLACKWELL, verdict, result_document(BLACKWELL, verdict, lm, RUN))
    lines = screen.splitlines()
    assert lines[-1] == (
        "FAIL: 1 of 1 metrics below tolerance: gsm8k_local exact_match,flexible-extract "
        "0.6917 < 0.7695 (= 0.81 x (1 - 0.05))."
    )
    flexible = next(i for i, line in enumerate(lines) if "flexible-extract" in line)
    strict = next(i for i, line in enumerate(lines) if "strict-match" in line)
    assert "LOW" in lines[flexible] and "not judged" in lines[strict]
    assert max(flexible, strict) < len(lines) - 1
    assert any("expected figures are upstream figures" in line for line in lines)
    assert len(lines) <= 24  # one screen


def test_screen_says_pass_and_flags_a_partial_run() -> None:
    lm = _lm_results(0.8)
    lm["n-samples"]["gsm8k_local"]["effective"] = 5
    verdict = judge(BLACKWELL, lm["results"])
    screen = render(BLACKWELL, verdict, result_document(BLACKWELL, verdict, lm, RUN))
    assert screen.splitlines()[-1] == "PASS: 1 of 1 metrics within tolerance (rtol 0.05)."
    assert "ran 5 samples, not the configured 1319" in screen
