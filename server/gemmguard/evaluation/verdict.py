"""Judging lm-eval results against a config: a one-sided rule, a one-screen verdict, a JSON record.

The rule is `measured >= value * (1 - rtol)` for every expected metric: only a drop fails.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from gemmguard.evaluation.config import EvalConfig

RESULT_SCHEMA = "gemmguard-eval-result/1"


@dataclass(frozen=True)
class Check:
    """One expected metric against its measured value."""

    task: str
    metric: str
    measured: float | None
    stderr: float | None
    expected: float
    rtol: float
    threshold: float
    passed: bool


@dataclass(frozen=True)
class Verdict:
    """Every check of one run; it passes only if every check passes."""

    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def judge(config: EvalConfig, results: Mapping[str, Any]) -> Verdict:
    """Apply the one-sided rule to every expected metric; a missing metric fails."""
    checks = []
    for task in config.tasks:
        measured_task = results.get(task.name, {})
        for metric in task.metrics:
            name, _, filt = metric.name.partition(",")
            measured = _number(measured_task.get(metric.name))
            stderr = _number(measured_task.get(f"{name}_stderr,{filt}"))
            threshold = config.threshold(metric)
            passed = measured is not None and measured >= threshold
            checks.append(
                Check(task.name, metric.name, measured, stderr, metric.value, config.rtol,
                      threshold, passed)
            )
    return Verdict(tuple(checks))


def compact_samples(samples: Mapping[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """lm-eval's per-(doc, filter) sample records folded into one record per doc."""
    folded: dict[str, list[dict[str, Any]]] = {}
    for task, records in samples.items():
        docs: dict[int, dict[str, Any]] = {}
        for record in records:
            doc = docs.setdefault(
                int(record["doc_id"]),
                {
                    "doc_id": int(record["doc_id"]),
                    "target": record.get("target"),
                    "response": _first_response(record.get("resps")),
                    "filters": {},
                },
            )
            filtered = record.get("filtered_resps") or [None]
            doc["filters"][record.get("filter", "none")] = {
                "extracted": filtered[0],
                **{m: record.get(m) for m in record.get("metrics", [])},
            }
        folded[task] = [docs[k] for k in sorted(docs)]
    return folded


def _first_response(resps: object) -> object:
    # lm-eval nests responses per request and per repeat: [[text]].
    while isinstance(resps, list) and resps:
        resps = resps[0]
    return resps


def result_document(
    config: EvalConfig,
    verdict: Verdict,
    lm_results: Mapping[str, Any],
    run: Mapping[str, Any],
) -> dict[str, Any]:
    """The JSON record of one run: config, server, settings, every metric, checks and samples."""
    metrics = {
        task: {k: v for k, v in values.items() if "," in k}
        for task, values in lm_results.get("results", {}).items()
    }
    return {
        "schema": RESULT_SCHEMA,
        "verdict": "pass" if verdict.passed else "fail",
        "config": {
            "path": str(config.path) if config.path else None,
            "model_name": config.model_name,
            "hardware": config.hardware,
            "rtol": config.rtol,
            "num_fewshot": config.num_fewshot,
            "limit": config.limit,
            "source": asdict(config.source),
            "measured_with": asdict(config.measured_with) if config.measured_with else None,
            "vllm_args": list(config.vllm_args),
            "env_vars": dict(config.env_vars),
        },
        "run": dict(run),
        "n_samples": lm_results.get("n-samples", {}),
        "metrics": metrics,
        "checks": [asdict(c) for c in verdict.checks],
        "lm_eval_version": lm_results.get("lm_eval_version"),
        "samples": compact_samples(lm_results.get("samples", {})),
    }


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(config: EvalConfig, verdict: Verdict, document: Mapping[str, Any]) -> str:
    """The one-screen verdict: context, every metric (judged or not), then PASS or FAIL."""
    run = document["run"]
    lines = [
        f"gemmguard eval: {config.model_name} on {config.hardware} ({config.path or config.stem})",
        f"  server    {run['base_url']}  model '{run['model']}'  {run.get('server') or ''}"
        .rstrip(),
    ]
    for task, counts in document["n_samples"].items():
        lines.append(
            f"  run       {task}: {counts.get('effective')} of {counts.get('original')} samples, "
            f"{config.num_fewshot}-shot, {run['model_type']}, {run['duration_s']:.0f} s"
        )
    lines.append(f"  expected  {config.source.kind}: {config.source.reference}")
    lines.append("")
    rows = [("task", "metric", "measured", "± stderr", "expected", "pass if >=", "result")]
    judged = {(c.task, c.metric) for c in verdict.checks}
    for check in verdict.checks:
        rows.append((
            check.task, check.metric, _fmt(check.measured), _fmt(check.stderr),
            _fmt(check.expected), _fmt(check.threshold),
            "ok" if check.passed else ("MISSING" if check.measured is None else "LOW"),
        ))
    for task, values in document["metrics"].items():
        for name, value in values.items():
            if "_stderr," in name or (task, name) in judged:
                continue
            stderr = values.get(name.replace(",", "_stderr,", 1))
            rows.append((task, name, _fmt(_number(value)), _fmt(_number(stderr)), "-", "-",
                         "not judged"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
              for row in rows]
    lines.append("")
    configured = config.limit
    for task, counts in document["n_samples"].items():
        original = counts.get("original")
        wanted = original if configured is None else min(configured, original)
        if counts.get("effective") != wanted:
            lines.append(
                f"  note: {task} ran {counts.get('effective')} samples, not the configured "
                f"{wanted}: read this as a smoke test of the pipeline, not a measurement."
            )
    for note in run.get("notes", []):
        lines.append(f"  note: {note}")
    if config.source.kind != "measured":
        origin = "placeholders" if config.source.kind == "placeholder" else "upstream figures"
        lines.append(
            f"  note: the expected figures are {origin}, not measured with this config; "
            "re-measure and record measured_with before relying on the verdict."
        )
    total = len(verdict.checks)
    if verdict.passed:
        lines.append(f"PASS: {total} of {total} metrics within tolerance (rtol {config.rtol}).")
    else:
        worst = ", ".join(
            f"{c.task} {c.metric} " + (
                "missing from lm-eval's results" if c.measured is None else
                f"{c.measured:.4f} < {c.threshold:.4f} (= {c.expected} x (1 - {c.rtol}))"
            )
            for c in verdict.failed
        )
        lines.append(f"FAIL: {len(verdict.failed)} of {total} metrics below tolerance: {worst}.")
    return "\n".join(lines)
