"""gemmguard against plain vLLM from `vllm bench serve` results, with the A/A control beside it.

Every result is vLLM's own JSON (`vllm bench serve --save-result`), tagged by benchmarks.rounds
with `--metadata ab_arm=ARM ab_load=LOAD ab_round=N`. Arms: `plain` (vLLM, no gemmguard plugin),
`gemmguard`, and `plain-b`, a second plain server: plain-b/plain is what no difference at all
looks like on that machine (A/A). A round's A/B ratio is gemmguard over the mean of the plain
servers that ran that round (plain and plain-b when both did, so each side of the A/A weighs the
same), on the same load; a row shows the median over rounds and the lowest and highest.
Start-up times come from `startup.jsonl` (one JSON object per server start, written by the
drivers) when it is there.

    python -m benchmarks.comparison RESULTS_DIR          # prints the Markdown summary
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# (field of vLLM's result JSON, what the report calls it, whether higher is better)
METRICS = (
    ("output_throughput", "output tok/s", True),
    ("median_tpot_ms", "median TPOT", False),
    ("median_ttft_ms", "median TTFT", False),
)
ARMS = ("plain", "gemmguard", "plain-b")
STARTUP_FILE = "startup.jsonl"


class ResultsError(ValueError):
    """The result files hold no round to compare."""


@dataclass(frozen=True)
class Run:
    """One `vllm bench serve` run, as vLLM saved it."""

    arm: str
    load: str
    round: int
    result: dict[str, Any]
    path: Path

    @property
    def complete(self) -> bool:
        """Every request answered: nothing failed, nothing missing."""
        r = self.result
        return int(r.get("failed", 0)) == 0 and int(r["completed"]) == int(r["num_prompts"])


@dataclass(frozen=True)
class Spread:
    """Median of per-round ratios, with the lowest and highest."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Spread | None:
        if not values:
            return None
        return cls(statistics.median(values), min(values), max(values), len(values))

    def text(self) -> str:
        return f"{self.median:.3f} ({self.low:.3f}–{self.high:.3f})"


def load_runs(folder: Path) -> list[Run]:
    """Every tagged result JSON in `folder` (untagged vLLM results are skipped)."""
    runs = []
    for path in sorted(folder.glob("*.json")):
        result = json.loads(path.read_text())
        if not isinstance(result, dict) or "ab_arm" not in result:
            continue
        runs.append(Run(str(result["ab_arm"]), str(result["ab_load"]), int(result["ab_round"]),
                        result, path))
    if not runs:
        raise ResultsError(
            f"No `vllm bench serve` result in {folder} carries ab_arm/ab_load/ab_round metadata. "
            "Run the benchmark drivers (make bench, scripts/gpu-bench.sh), which tag each run.")
    return runs


def rounds_of(runs: list[Run], load: str) -> dict[int, dict[str, Run]]:
    """{round: {arm: run}} on one load."""
    by_round: dict[int, dict[str, Run]] = {}
    for run in runs:
        if run.load == load:
            by_round.setdefault(run.round, {})[run.arm] = run
    return dict(sorted(by_round.items()))


def _usable(arms: dict[str, Run], arm: str) -> bool:
    return all(a in arms and arms[a].complete for a in (arm, "plain"))


def _reference(arms: dict[str, Run], arm: str, field: str) -> float:
    """What ARM is compared with: plain, or for gemmguard the mean of every plain server."""
    plains = ["plain"]
    if arm == "gemmguard" and "plain-b" in arms and arms["plain-b"].complete:
        plains.append("plain-b")
    return statistics.mean(float(arms[p].result[field]) for p in plains)


def round_ratios(runs: list[Run], load: str, arm: str, field: str) -> list[float]:
    """ARM over its reference (`_reference`) of `field` in every round of `load` where both
    answered every request."""
    return [float(arms[arm].result[field]) / _reference(arms, arm, field)
            for arms in rounds_of(runs, load).values() if _usable(arms, arm)]


def unpaired(runs: list[Run]) -> list[str]:
    """Rounds left out of a ratio: an arm ran without a complete `plain` run, or alone."""
    notes = []
    for load in dict.fromkeys(run.load for run in runs):
        for number, arms in rounds_of(runs, load).items():
            if len(arms) < 2 or not all(_usable(arms, a) for a in arms if a != "plain"):
                ran = ", ".join(f"{a}{'' if r.complete else ' (incomplete)'}"
                                for a, r in sorted(arms.items()))
                notes.append(f"{load} round {number} has {ran}")
    return notes


@dataclass(frozen=True)
class Row:
    """One load and metric: the A/B and A/A spreads (None: no usable round)."""

    load: str
    metric: str
    ab: Spread | None
    aa: Spread | None


def rows(runs: list[Run]) -> list[Row]:
    return [Row(load, name, Spread.of(round_ratios(runs, load, "gemmguard", field)),
                Spread.of(round_ratios(runs, load, "plain-b", field)))
            for load in dict.fromkeys(run.load for run in runs) for field, name, _ in METRICS]


def startup_lines(records: list[dict[str, Any]]) -> list[str]:
    """Each start, and gemmguard's /health and ready times against plain's /health per start.

    A record is `{"arm", "start", "health_s", "ready_s"?, ...}`; `start` numbers an arm's starts
    (on the GPU start 1 compiles, start 2 finds torch.compile's cache), so like is compared with
    like.
    """
    if not records:
        return []
    lines = ["| server | start | launch → /health 200 | launch → /gemmguard/ready 200 |",
             "|---|---|---|---|"]
    by_key = {(str(r["arm"]), int(r["start"])): r for r in records}
    for (arm, start), r in by_key.items():
        ready = r.get("ready_s")
        lines.append(f"| {arm} | {start} | {float(r['health_s']):.1f} s | "
                     + (f"{float(ready):.1f} s |" if ready is not None else "– |"))
    ratios = []
    for (arm, start), r in by_key.items():
        plain = by_key.get(("plain", start))
        if arm == "gemmguard" and plain is not None:
            text = f"start {start}: /health {float(r['health_s']) / float(plain['health_s']):.3f}×"
            if r.get("ready_s") is not None:
                text += f", ready {float(r['ready_s']) / float(plain['health_s']):.3f}×"
            ratios.append(text)
    if ratios:
        lines += ["", "Start-up gemmguard/plain: " + "; ".join(ratios) + "."]
    return lines


def markdown(folder: Path) -> str:
    runs = load_runs(folder)
    lines = [
        f"Model `{runs[0].result.get('model_id')}`, {len(runs)} `vllm bench serve` runs. Ratios "
        "per round, gemmguard over the mean of the plain servers of that round (A/B) and "
        "plain-b/plain (A/A, two plain servers): median (lowest–highest). For tok/s higher "
        "is better, for TPOT and TTFT lower.",
        "",
        "| load | metric | gemmguard/plain | A/A plain-b/plain | rounds (A/B, A/A) |",
        "|---|---|---|---|---|",
    ]
    for row in rows(runs):
        ab = row.ab.text() if row.ab else "no usable round"
        aa = row.aa.text() if row.aa else "no usable round"
        lines.append(f"| {row.load} | {row.metric} | {ab} | {aa} | "
                     f"{row.ab.n if row.ab else 0}, {row.aa.n if row.aa else 0} |")
    lines += ["", "| load | arm | complete runs | output tok/s | median TPOT | median TTFT "
              "| prompts × in/out | concurrency |", "|---|---|---|---|---|---|---|---|"]
    for load in dict.fromkeys(r.load for r in runs):
        for arm in ARMS:
            mine = [r.result for r in runs if r.load == load and r.arm == arm and r.complete]
            if not mine:
                continue
            med = {f: statistics.median(float(m[f]) for m in mine) for f, _, _ in METRICS}
            m = mine[0]
            size = (f"{m['num_prompts']} × {round(m['total_input_tokens'] / m['num_prompts'])}/"
                    f"{round(m['total_output_tokens'] / m['num_prompts'])}")
            lines.append(f"| {load} | {arm} | {len(mine)} | {med['output_throughput']:.1f} | "
                         f"{med['median_tpot_ms']:.2f} ms | {med['median_ttft_ms']:.1f} ms | "
                         f"{size} | {m['max_concurrency']} |")
    lines.append("")
    broken = [r.path.name for r in runs if not r.complete]
    lines.append(f"Incomplete runs (failed or missing requests): {', '.join(broken)}."
                 if broken else "Every request of every run was answered.")
    notes = unpaired(runs)
    if notes:
        lines.append("Left out of the ratios: " + "; ".join(notes) + ".")
    startup = folder / STARTUP_FILE
    if startup.is_file():
        records = [json.loads(line) for line in startup.read_text().splitlines() if line.strip()]
        lines += ["", *startup_lines(records)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.comparison",
        description="Print gemmguard/plain and A/A ratios from tagged `vllm bench serve` results.")
    parser.add_argument("results", type=Path, help="Folder of result JSONs (and startup.jsonl).")
    args = parser.parse_args(argv)
    try:
        print(markdown(args.results))
    except ResultsError as exc:
        print(f"benchmarks.comparison: {exc}", file=sys.stderr)
        return 1
    # Exit 1 when some load has no A/B ratio: a run failed (the summary says which).
    return 0 if all(row.ab for row in rows(load_runs(args.results))) else 1


if __name__ == "__main__":
    sys.exit(main())
