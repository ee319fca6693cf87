"""The degraded threshold, set from real kernels' recordings rather than by hand.

Every recording (`selfcheck.recording`) is replayed through the check for each of its seeds: as
recorded (an honest kernel must pass) and with each fault applied (it must fail). Families whose
kernel makes a loss the scheme does not prescribe (`LOSSY`: read from vLLM's source,
docs/kernel-arithmetic.md) are real losses: they are not honest, and their excess counts among
the faulty ones. The threshold on excess bits is the middle of the margin between the largest
honest excess and the smallest faulty excess of an accuracy fault (E8M0 re-quantization, real or
injected); corrupted blocks and experts are caught by the block error instead, and are reported
beside it.

    python -m gemmguard.selfcheck.calibration tests/fixtures/recordings [--write]

prints the budget per family and, with --write, stores the threshold (calibration.json, read by
`measure`) and the table in docs/calibration.md.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from gemmguard.selfcheck import recording
from gemmguard.selfcheck.measure import FAILING, LayerResult
from gemmguard.selfcheck.recording import Recording

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")
# Faults whose loss is the kind the degraded threshold exists for (a fraction of a bit).
ACCURACY_FAULTS = ("e8m0",)

# Recording families (file names) whose kernel loses what the scheme does not prescribe.
LOSSY = {
    "dense-fp8block-deepgemm": "DeepGEMM re-quantizes FP8 block weight scales to powers of two "
    "(E8M0) at load",
    "moe-fp8block-default": "with DeepGEMM available vLLM re-quantizes the experts' FP8 block "
    "scales to E8M0 at load and TritonExperts quantizes activations with power-of-two scales",
    "moe-fp8block-deepgemm": "DeepGEMM MoE: E8M0 weight and activation scales",
    "moe-fp8block-triton": "TritonExperts' activation quantization keeps power-of-two (E8M0) "
    "scales while VLLM_USE_DEEP_GEMM_E8M0 is on, even with DeepGEMM off",
    "dense-w4a8fp8-cutlass": "CUTLASS W4A8 squeezes the checkpoint's bf16 group scales into "
    "fp8 and stores each q·s rounded to fp8",
}


@dataclass
class FamilyBudget:
    """One recording family's replays: honest excess, and what each fault did."""

    family: str
    kernels: set[str] = field(default_factory=set)
    origin: dict[str, str] = field(default_factory=dict)
    layers: int = 0
    seeds: int = 0
    lossy: str = ""
    honest_excess: list[float] = field(default_factory=list)
    honest_verdicts: dict[str, int] = field(default_factory=dict)
    # fault → excess bits and verdicts over every layer and seed
    fault_excess: dict[str, list[float]] = field(default_factory=dict)
    fault_verdicts: dict[str, dict[str, int]] = field(default_factory=dict)

    def worst_honest(self) -> float:
        return max(self.honest_excess, default=-math.inf)

    def least_faulty(self, faults: tuple[str, ...] = ACCURACY_FAULTS) -> float:
        values = [v for f in faults for v in self.fault_excess.get(f, [])]
        if self.lossy:
            values += self.honest_excess
        return min(values, default=math.inf)


def _excess(result: LayerResult) -> float:
    if result.excess_bits is not None:
        return result.excess_bits
    return math.inf if result.verdict == "broken" else -math.inf


def _count(counts: dict[str, int], verdict: str) -> None:
    counts[verdict] = counts.get(verdict, 0) + 1


def budget(recordings: dict[str, list[Recording]]) -> list[FamilyBudget]:
    """Replay every recording for every seed, as recorded and with each fault."""
    out = []
    for family, layers in recordings.items():
        name = family.split(".rank")[0]
        fam = FamilyBudget(name, lossy=LOSSY.get(name, ""), layers=len(layers))
        for rec in layers:
            fam.kernels.add(rec.kernel)
            fam.origin = rec.origin
            fam.seeds = max(fam.seeds, len(rec.seeds))
            for seed in rec.seeds:
                honest = recording.replay(rec, seed)
                fam.honest_excess.append(_excess(honest))
                _count(fam.honest_verdicts, honest.verdict)
                for fault in recording.faults_for(rec):
                    result = recording.replay(rec, seed, fault)
                    fam.fault_excess.setdefault(fault, []).append(_excess(result))
                    _count(fam.fault_verdicts.setdefault(fault, {}), result.verdict)
        out.append(fam)
    return out


def threshold(families: list[FamilyBudget]) -> tuple[float, float, float]:
    """(largest honest excess, smallest faulty excess, the threshold in the middle)."""
    honest = max((f.worst_honest() for f in families if not f.lossy), default=-math.inf)
    faulty = min((f.least_faulty() for f in families), default=math.inf)
    if not (math.isfinite(honest) and math.isfinite(faulty)):
        raise ValueError("the recordings give no honest or no faulty excess to calibrate on")
    if honest >= faulty:
        raise ValueError(f"no margin: an honest kernel loses {honest:.4f} bit beyond the ideal, "
                         f"a faulty one only {faulty:.4f}; the check cannot tell them apart")
    return honest, faulty, (honest + faulty) / 2


def _fmt(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else ("∞" if value > 0 else "−∞")


def _verdicts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))


def table(families: list[FamilyBudget]) -> str:
    """The budget as a Markdown table, one row per family."""
    lines = ["| family | kernel(s) | recorded on | layers × seeds | largest honest excess | "
             "honest verdicts | smallest E8M0-fault excess | faults caught |",
             "|---|---|---|---|---|---|---|---|"]
    for fam in families:
        origin = (f"{fam.origin.get('device', '?')}, vLLM {fam.origin.get('vllm', '?')}, "
                  f"torch {fam.origin.get('torch', '?')}")
        caught = "; ".join(
            f"{fault} {sum(n for v, n in counts.items() if v in FAILING)}/{sum(counts.values())}"
            for fault, counts in fam.fault_verdicts.items())
        honest = _fmt(fam.worst_honest()) + (" (real loss)" if fam.lossy else "")
        lines.append(
            f"| {fam.family} | {', '.join(sorted(fam.kernels))} | {origin} | "
            f"{fam.layers} × {fam.seeds} | {honest} | {_verdicts(fam.honest_verdicts)} | "
            f"{_fmt(min(fam.fault_excess.get('e8m0', [math.inf])))} | {caught} |")
    return "\n".join(lines)


def write(families: list[FamilyBudget], docs: Path) -> dict[str, float]:
    honest, faulty, middle = threshold(families)
    values = {"largest_honest_excess_bits": round(honest, 4),
              "smallest_faulty_excess_bits": round(faulty, 4),
              "degraded_excess_bits": round(middle, 4)}
    CALIBRATION_FILE.write_text(json.dumps(values, indent=1) + "\n")
    lossy = "\n".join(f"- `{name}`: {why}." for name, why in LOSSY.items())
    docs.write_text(f"""# The self-check's calibration (generated)

Made by `python -m gemmguard.selfcheck.calibration tests/fixtures/recordings --write` from the
kernel outputs `scripts/gpu-record.sh` recorded (and the CPU recordings beside them): every layer
of every family replayed through the check for each seed, as recorded and with each fault
applied to the real outputs (see `gemmguard.selfcheck.recording`). Excess is in bits beyond the
scheme's ideal. The degraded threshold is the middle of the margin between the largest honest
excess and the smallest excess of an accuracy fault (injected E8M0, or a real loss):

- largest honest excess: **{honest:.4f}** bit
- smallest faulty excess: **{faulty:.4f}** bit
- degraded above: **{middle:.4f}** bit (`server/gemmguard/selfcheck/calibration.json`)

Families whose kernel makes a loss the scheme does not prescribe (read from vLLM's source,
docs/kernel-arithmetic.md), counted as faulty, not honest:
{lossy}

{table(families)}
""")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recordings", type=Path)
    parser.add_argument("--write", action="store_true",
                        help="Store the threshold and write docs/calibration.md.")
    parser.add_argument("--docs", type=Path, default=Path("docs/calibration.md"))
    args = parser.parse_args()
    families = budget(recording.load_all(args.recordings))
    print(table(families))
    honest, faulty, middle = threshold(families)
    print(f"\nlargest honest {honest:.4f}, smallest faulty {faulty:.4f}, threshold {middle:.4f}")
    if args.write:
        write(families, args.docs)


if __name__ == "__main__":
    main()
