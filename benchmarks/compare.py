"""gemmguard against plain vLLM: per-round ratios, their spread, the goals and the noise.

Pure functions over the JSON-ready dicts the runner records (`BatchResult.as_dict()` rows
with a `round`, start-up samples), so they can be tested without a server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from benchmarks.stats import geometric_mean, is_number, meets, ratio, spread_dict

# metric name → (how to read it from a batch row, higher is better)
METRICS: dict[str, tuple[Callable[[dict[str, Any]], float | None], bool]] = {
    "requests_per_s": (lambda b: b["requests_per_s"], True),
    "output_tokens_per_s": (lambda b: b["output_tokens_per_s"], True),
    "latency_p50_s": (lambda b: b["latency_s"]["p50"], False),
    "latency_p95_s": (lambda b: b["latency_s"]["p95"], False),
    "ttft_p50_s": (lambda b: b["ttft_s"]["p50"], False),
    "ttft_p95_s": (lambda b: b["ttft_s"]["p95"], False),
}
# Issue 10's goals, on the median over rounds of the gemmguard/plain ratio.
GOALS = {
    "throughput": ("requests_per_s", 0.99, True),
    "p50_latency": ("latency_p50_s", 1.01, False),
}


def _cell_key(batch: dict[str, Any]) -> tuple[int, bool]:
    return int(batch["concurrency"]), bool(batch["stream"])


def compare_cells(batches: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (concurrency, stream): each side's values and the ratio, with spread.

    A ratio is taken within a round (the two servers ran back to back), then its median,
    lowest and highest over the rounds are reported.
    """
    grouped: dict[tuple[int, bool], dict[int, dict[str, dict[str, Any]]]] = {}
    for b in batches:
        if b.get("warmup"):
            continue
        grouped.setdefault(_cell_key(b), {}).setdefault(int(b["round"]), {})[b["server"]] = b
    cells = []
    for (concurrency, stream), rounds in sorted(grouped.items()):
        paired = [r for r in rounds.values() if {"gemmguard", "plain"} <= r.keys()]
        cell: dict[str, Any] = {"concurrency": concurrency, "stream": stream,
                                "rounds": len(paired), "gemmguard": {}, "plain": {}, "ratio": {}}
        for metric, (read, _) in METRICS.items():
            g = [read(r["gemmguard"]) for r in paired]
            p = [read(r["plain"]) for r in paired]
            cell["gemmguard"][metric] = spread_dict(g)
            cell["plain"][metric] = spread_dict(p)
            cell["ratio"][metric] = spread_dict(ratio(a, b) for a, b in zip(g, p, strict=True))
        for side in ("gemmguard", "plain"):
            cell[side]["first_chunk_at_end"] = spread_dict(
                r[side].get("first_chunk_at_end") for r in paired)
        cell["goals"] = {goal: meets(_median(cell["ratio"][metric]), bound, higher)
                         for goal, (metric, bound, higher) in GOALS.items()}
        # Whether the rounds fell on both sides of the bound: the verdict is then the noise's.
        cell["goal_bound_within_spread"] = {
            goal: bool(found["n"] > 1 and found["low"] <= bound <= found["high"])
            if (found := cell["ratio"][metric]) else None
            for goal, (metric, bound, _) in GOALS.items()}
        cells.append(cell)
    return cells


def _median(found: dict[str, Any] | None) -> float | None:
    return found["median"] if found else None


def goals_summary(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Per goal: in how many cells it is met, and the geometric mean of the median ratios."""
    out: dict[str, Any] = {}
    for goal, (metric, bound, higher) in GOALS.items():
        verdicts = [c["goals"][goal] for c in cells if c["goals"][goal] is not None]
        overall = geometric_mean(_median(c["ratio"][metric]) for c in cells)
        out[goal] = {"metric": metric, "bound": bound,
                     "direction": ">=" if higher else "<=",
                     "cells_met": sum(1 for v in verdicts if v), "cells": len(verdicts),
                     "overall_ratio": overall, "overall_met": meets(overall, bound, higher)}
    return out


def noise(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """How much each server disagreed with itself over rounds (relative width, A/A noise).

    A ratio that differs from 1 by less than this cannot be told apart from noise.
    """
    out: dict[str, Any] = {}
    for metric in ("requests_per_s", "latency_p50_s"):
        widths = [c[side][metric]["relative_width"] for c in cells
                  for side in ("gemmguard", "plain")
                  if c[side][metric] and c[side][metric]["n"] > 1]
        ratio_widths = [c["ratio"][metric]["relative_width"] for c in cells
                        if c["ratio"][metric] and c["ratio"][metric]["n"] > 1]
        out[metric] = {"self_relative_width": spread_dict(widths),
                       "ratio_relative_width": spread_dict(ratio_widths)}
    return out


def load_held(batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Per server and in all: requests sent, answered, 5xx, lost, other HTTP, short answers."""
    keys = ("sent", "answered", "http_5xx", "http_other", "lost", "short")
    per: dict[str, dict[str, int]] = {}
    errors: dict[str, list[str]] = {}
    for b in batches:
        totals = per.setdefault(b["server"], dict.fromkeys(keys, 0))
        for key in keys:
            totals[key] += int(b[key])
        errors.setdefault(b["server"], []).extend(b.get("errors", []))
    held = bool(per) and all(t["answered"] == t["sent"] for t in per.values())
    return {"held": held, "servers": per,
            "errors": {s: sorted(set(e))[:5] for s, e in errors.items() if e}}


def startup_models(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model: time to first completion of each server, their ratio, the self-check share."""
    models: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        models.setdefault(s["model"], []).append(s)
    rows = []
    for model, found in models.items():
        g = [s for s in found if s["server"] == "gemmguard"]
        p = [s for s in found if s["server"] == "plain"]
        g_first = [s["startup"]["first_completion_s"] for s in g]
        p_first = [s["startup"]["first_completion_s"] for s in p]
        checks = [s["startup"]["selfcheck"] or {} for s in g]
        shares = [ratio(c.get("duration_seconds"), s["startup"]["first_completion_s"])
                  for c, s in zip(checks, g, strict=True)]
        g_mid, p_mid = _median(spread_dict(g_first)), _median(spread_dict(p_first))
        rows.append({
            "model": model,
            "gemmguard_first_completion_s": spread_dict(g_first),
            "plain_first_completion_s": spread_dict(p_first),
            "ratio": ratio(g_mid, p_mid),
            "difference_s": g_mid - p_mid if is_number(g_mid) and is_number(p_mid) else None,
            "selfcheck_s": spread_dict(c.get("duration_seconds") for c in checks),
            "selfcheck_share": spread_dict(shares),
            "selfcheck_passed": all(c.get("passed") for c in checks) if checks else None,
            "selfcheck_kernels": sorted({k for c in checks for k in c.get("kernels", [])}),
            "sample_bytes": checks[0].get("sample_bytes") if checks else None,
            "model_bytes": checks[0].get("model_bytes") if checks else None,
            "sample_fraction": checks[0].get("sample_fraction") if checks else None,
            "plain_missing_reason": found[0].get("plain_missing_reason") if not p else None,
            "phases": {"gemmguard": _phases(g), "plain": _phases(p)},
            "gemmguard_peak_rss_bytes": spread_dict(s["memory"]["tree_rss_bytes"] for s in g),
            "plain_peak_rss_bytes": spread_dict(s["memory"]["tree_rss_bytes"] for s in p),
            "gemmguard_peak_pss_bytes": spread_dict(s["memory"].get("tree_pss_bytes") for s in g),
            "plain_peak_pss_bytes": spread_dict(s["memory"].get("tree_pss_bytes") for s in p),
            "gemmguard_peak_uss_bytes": spread_dict(s["memory"].get("tree_uss_bytes") for s in g),
            "plain_peak_uss_bytes": spread_dict(s["memory"].get("tree_uss_bytes") for s in p),
        })
    return rows


# Start-up milestones, in the order they happen: a process of each role created, then answers.
PHASES = ("api-server", "engine-core", "worker", "health", "first_completion")


def _phases(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Median seconds from spawn to each start-up milestone, over the samples."""
    out: dict[str, Any] = {}
    for phase in PHASES:
        if phase in ("health", "first_completion"):
            values = [s["startup"].get(f"{phase}_s") for s in samples]
        else:
            values = [(s["startup"].get("processes_started_s") or {}).get(phase)
                      for s in samples]
        out[phase] = spread_dict(values)
    out["other_busy_fraction"] = spread_dict(
        (s["startup"].get("host_load") or {}).get("other_busy_fraction") for s in samples)
    return out


def memory_rows(request_path: dict[str, Any] | None,
                startup: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Peak memory, gemmguard against plain: under load (request path) and per start-up."""
    rows = []
    if request_path and request_path.get("memory"):
        mem = request_path["memory"]
        rows.append(_memory_row("demo-bf16, start-up and the whole load", mem.get("gemmguard"),
                                mem.get("plain")))
    for row in startup:
        g = {f"tree_{m}_bytes": _median(row.get(f"gemmguard_peak_{m}_bytes"))
             for m in ("rss", "pss", "uss")}
        p = {f"tree_{m}_bytes": _median(row.get(f"plain_peak_{m}_bytes"))
             for m in ("rss", "pss", "uss")}
        rows.append(_memory_row(f"{row['model']}, start-up only", g, p))
    return rows


def _memory_row(phase: str, g: dict[str, Any] | None, p: dict[str, Any] | None) -> dict[str, Any]:
    g, p = g or {}, p or {}
    return {"phase": phase,
            "gemmguard_tree_rss_bytes": g.get("tree_rss_bytes"),
            "plain_tree_rss_bytes": p.get("tree_rss_bytes"),
            "rss_ratio": ratio(g.get("tree_rss_bytes"), p.get("tree_rss_bytes")),
            "gemmguard_tree_pss_bytes": g.get("tree_pss_bytes"),
            "plain_tree_pss_bytes": p.get("tree_pss_bytes"),
            "pss_ratio": ratio(g.get("tree_pss_bytes"), p.get("tree_pss_bytes")),
            "gemmguard_tree_uss_bytes": g.get("tree_uss_bytes"),
            "plain_tree_uss_bytes": p.get("tree_uss_bytes"),
            "uss_ratio": ratio(g.get("tree_uss_bytes"), p.get("tree_uss_bytes")),
            "gemmguard_by_role": g.get("rss_bytes_by_role", {}),
            "plain_by_role": p.get("rss_bytes_by_role", {})}


def derive(results: dict[str, Any]) -> dict[str, Any]:
    """Fill every summary from the raw measurements (batches, start-up samples), in place.

    The runner calls this once at the end; `--render` calls it again on a saved JSON, so a
    report can be re-derived with the current code without measuring again.
    """
    path = results.get("request_path")
    if path and path.get("batches") is not None:
        path["cells"] = compare_cells(path["batches"])
        path["goals"] = goals_summary(path["cells"])
        path["noise"] = noise(path["cells"])
        path["load_held"] = load_held(path["batches"])
    results["load_held"] = path["load_held"] if path else None
    startup = results.get("startup")
    if startup and startup.get("samples") is not None:
        startup["models"] = startup_models(startup["samples"])
    results["memory"] = {"rows": memory_rows(path, (startup or {}).get("models", []))}
    return results
