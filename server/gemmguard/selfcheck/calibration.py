"""The degraded threshold, set from real kernels' recordings rather than by hand.

Every recording (`selfcheck.recording`) is replayed through the check for each of its seeds: as
recorded, and with each fault applied to the real outputs. The threshold on excess bits is the
middle of the margin between the largest excess of an honest kernel and the smallest excess of
the injected accuracy fault (E8M0 re-quantization); corrupted blocks and experts are caught by
the block error instead, and are reported beside it.

Layers `KNOWN` not to be honest kernels are set apart: a kernel that makes a loss the scheme
does not prescribe (read from vLLM's source, docs/kernel-arithmetic.md) or that was seen
returning wrong outputs must fail for every seed. Neither sets the threshold: how much a real
loss costs depends on the weights.

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

# What recordings hold besides honest kernels, by family (file name): (kind, which layers, why).
# "loss": a kernel that loses what the scheme does not prescribe (read from vLLM's source,
# docs/kernel-arithmetic.md); "fault": a kernel seen returning wrong outputs.
# Layers: "quantized" (every layer not stored unquantized) or "moe" (the experts only).
KNOWN: dict[str, tuple[str, str, str]] = {
    "dense-fp8block-deepgemm": ("loss", "quantized", "DeepGEMM re-quantizes FP8 block weight "
                                "scales to powers of two (E8M0) at load"),
    "moe-fp8block-default": ("loss", "quantized", "with DeepGEMM on (vLLM's default) the dense "
                             "layers run DeepGEMM (E8M0 scales) and TritonExperts quantizes "
                             "activations with power-of-two scales and gets E8M0-requantized "
                             "experts"),
    "moe-fp8block-deepgemm": ("loss", "quantized", "DeepGEMM dense and MoE: E8M0 weight and "
                              "activation scales"),
    "dense-w4a8fp8-cutlass": ("loss", "quantized", "CUTLASS W4A8 squeezes the checkpoint's bf16 "
                              "group scales into fp8 and stores each q·s rounded to fp8"),
    "dense-fp8block-marlin": ("loss", "quantized", "weight-only FP8 Marlin (vLLM's FP8 path on "
                              "GPUs without FP8 MMA, e.g. Ampere) casts the fp32 block scales "
                              "to bf16 before dequantizing: bf(q·bf16(s)) "
                              "(marlin_utils_fp8.py); its outputs equal that emulation bit for "
                              "bit on an H100"),
    "moe-w4a16-marlin": ("fault", "moe", "MarlinExperts returns wrong outputs (every expert "
                         "broken, 0.94 correlated, 2.8× the norm) when the experts' MLP width "
                         "equals the int4 group size (128: one group along the down "
                         "projection's K); the same checkpoint 256 wide matches the ideal "
                         "exactly (moe-w4a16-marlin-i256). Seen on vLLM 0.26, H100; the cause "
                         "was not read in the source"),
}
ACCURACY_FAULTS = ("e8m0",)


@dataclass
class FamilyBudget:
    """One recording family's replays: honest excess, real losses, and what each fault did."""

    family: str
    kernels: set[str] = field(default_factory=set)
    origin: dict[str, str] = field(default_factory=dict)
    layers: int = 0
    seeds: int = 0
    kind: str = "honest"  # what its non-honest layers are (`KNOWN`), or honest
    why: str = ""
    honest_excess: list[float] = field(default_factory=list)
    honest_verdicts: dict[str, int] = field(default_factory=dict)
    # the known (loss, fault) layers: excess, and per seed whether any failed
    loss_excess: list[float] = field(default_factory=list)
    loss_verdicts: dict[str, int] = field(default_factory=dict)
    loss_seen: dict[int, bool] = field(default_factory=dict)
    # fault → excess bits and verdicts over every layer and seed
    fault_excess: dict[str, list[float]] = field(default_factory=dict)
    fault_verdicts: dict[str, dict[str, int]] = field(default_factory=dict)

    def worst_honest(self) -> float:
        return max(self.honest_excess, default=-math.inf)

    def least_faulty(self, faults: tuple[str, ...] = ACCURACY_FAULTS) -> float:
        return min((v for f in faults for v in self.fault_excess.get(f, [])), default=math.inf)


def _excess(result: LayerResult) -> float:
    """The largest excess the verdict was judged on: the layer's, or a judged expert's."""
    if result.verdict == "broken" and result.excess_bits is None:
        return math.inf
    values = [result.excess_bits] + [e["excess_bits"] for e in result.experts
                                     if e.get("excess_judged")]
    return max((v for v in values if v is not None), default=-math.inf)


def _count(counts: dict[str, int], verdict: str) -> None:
    counts[verdict] = counts.get(verdict, 0) + 1


def kind_of(family: str, rec: Recording) -> str:
    """honest, loss or fault: what `rec`'s kernel is known to be (`KNOWN`)."""
    if family not in KNOWN:
        return "honest"
    kind, layers, _ = KNOWN[family]
    if rec.scheme.startswith("unquantized") or (layers == "moe" and rec.layer_type != "moe"):
        return "honest"
    return kind


def budget(recordings: dict[str, list[Recording]]) -> list[FamilyBudget]:
    """Replay every recording for every seed, as recorded and with each fault."""
    out = []
    for family, layers in recordings.items():
        name = family.split(".rank")[0]
        kind, _, why = KNOWN.get(name, ("honest", "", ""))
        fam = FamilyBudget(name, kind=kind, why=why, layers=len(layers))
        for rec in layers:
            fam.kernels.add(rec.kernel)
            fam.origin = rec.origin
            fam.seeds = max(fam.seeds, len(rec.seeds))
            for seed in rec.seeds:
                result = recording.replay(rec, seed)
                if kind_of(name, rec) != "honest":
                    fam.loss_excess.append(_excess(result))
                    _count(fam.loss_verdicts, result.verdict)
                    fam.loss_seen[seed] = fam.loss_seen.get(seed, False) or \
                        result.verdict in FAILING
                else:
                    fam.honest_excess.append(_excess(result))
                    _count(fam.honest_verdicts, result.verdict)
                for fault in recording.faults_for(rec):
                    faulty = recording.replay(rec, seed, fault)
                    fam.fault_excess.setdefault(fault, []).append(_excess(faulty))
                    _count(fam.fault_verdicts.setdefault(fault, {}), faulty.verdict)
        out.append(fam)
    return out


def threshold(families: list[FamilyBudget]) -> tuple[float, float, float]:
    """(largest honest excess, smallest injected-fault excess, the threshold in the middle)."""
    honest = max((f.worst_honest() for f in families), default=-math.inf)
    faulty = min((f.least_faulty() for f in families), default=math.inf)
    broken = [f.family for f in families if f.worst_honest() == math.inf]
    if broken:
        raise ValueError(f"a layer counted honest is broken in {', '.join(broken)}: list its "
                         "family in calibration.KNOWN with the reason, or record it again")
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
             "honest verdicts | known loss or fault: excess (verdicts) | "
             "smallest E8M0-fault excess | "
             "faults caught |",
             "|---|---|---|---|---|---|---|---|---|"]
    for fam in families:
        origin = (f"{fam.origin.get('device', '?')}, vLLM {fam.origin.get('vllm', '?')}, "
                  f"torch {fam.origin.get('torch', '?')}")
        caught = "; ".join(
            f"{fault} {sum(n for v, n in counts.items() if v in FAILING)}/{sum(counts.values())}"
            for fault, counts in fam.fault_verdicts.items())
        loss = (f"{fam.kind}: {_fmt(min(fam.loss_excess))}–{_fmt(max(fam.loss_excess))} "
                f"({_verdicts(fam.loss_verdicts)})") if fam.loss_excess else "–"
        lines.append(
            f"| {fam.family} | {', '.join(sorted(fam.kernels))} | {origin} | "
            f"{fam.layers} × {fam.seeds} | {_fmt(fam.worst_honest())} | "
            f"{_verdicts(fam.honest_verdicts)} | {loss} | {_fmt(fam.least_faulty())} | "
            f"{caught} |")
    return "\n".join(lines)


def write(families: list[FamilyBudget], docs: Path) -> dict[str, float]:
    honest, faulty, middle = threshold(families)
    values = {"largest_honest_excess_bits": round(honest, 4),
              "smallest_faulty_excess_bits": round(faulty, 4),
              "degraded_excess_bits": round(middle, 4)}
    CALIBRATION_FILE.write_text(json.dumps(values, indent=1) + "\n")
    known = "\n".join(f"- `{name}` ({kind}, {layers} layers): {why}."
                      for name, (kind, layers, why) in KNOWN.items())
    docs.write_text(f"""# The self-check's calibration (generated)

Made by `python -m gemmguard.selfcheck.calibration tests/fixtures/recordings --write` from the
kernel outputs `scripts/gpu-record.sh` recorded (commands and raw reports: docs/gpu-record/):
every layer of every family replayed through the check for each seed, as recorded and with each
fault applied to the real outputs (see `gemmguard.selfcheck.recording`). Excess is in bits
beyond the scheme's ideal. The degraded threshold is the middle of the margin between the
largest honest excess and the smallest excess of the injected accuracy fault (E8M0):

- largest honest excess: **{honest:.4f}** bit
- smallest injected-fault excess: **{faulty:.4f}** bit
- degraded above: **{middle:.4f}** bit (`server/gemmguard/selfcheck/calibration.json`)

Layers that are not honest kernels, by family (they do not set the threshold; each must fail
for every seed):
{known}

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
    try:
        honest, faulty, middle = threshold(families)
    except ValueError as exc:
        raise SystemExit(f"gemmguard calibration: {exc}.") from None
    print(f"\nlargest honest {honest:.4f}, smallest faulty {faulty:.4f}, threshold {middle:.4f}")
    if args.write:
        write(families, args.docs)


if __name__ == "__main__":
    main()
