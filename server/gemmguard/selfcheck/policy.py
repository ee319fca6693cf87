"""The whole engine's self-check, as every rank reported it: counts, completeness, a summary.

Decisions are made at load, per rank, by `selfcheck.load_check`; this module only reads
what the ranks report, for the API server, the CLI and the refusal report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gemmguard.selfcheck.measure import FAILING, VERDICTS


@dataclass
class Outcome:
    """Every rank's results (dicts of `RankCheck.as_dict`) and the policies they ran under."""

    policy: str
    ranks: list[dict[str, Any]]
    unchecked_policy: str = "warn"

    @property
    def layers(self) -> list[dict[str, Any]]:
        return [layer for rank in self.ranks for layer in rank["layers"]]

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(VERDICTS, 0)
        for layer in self.layers:
            counts[layer["verdict"]] += 1
        return counts

    @property
    def passed(self) -> bool:
        """No checked layer runs a degraded or broken kernel (see `complete` for the rest)."""
        return not any(layer["verdict"] in FAILING for layer in self.layers)

    @property
    def complete(self) -> bool:
        """Every GEMM-owning layer was checked."""
        return bool(self.layers) and not any(layer["verdict"] == "unchecked"
                                             for layer in self.layers)

    @property
    def refusal(self) -> str:
        return "; ".join(rank["refusal"] for rank in self.ranks if rank.get("refusal"))

    @property
    def serves(self) -> bool:
        """Whether the server may take traffic with this outcome."""
        return not self.refusal

    @property
    def action(self) -> str:
        if self.refusal:
            return "refuse"
        return "serve" if self.passed else "serve-degraded"

    def replacements(self) -> list[dict[str, Any]]:
        """Layers whose kernel the check rejected, with what replaced it (if anything)."""
        return [{"layer": layer["layer"], **layer["replacement"]} for layer in self.layers
                if layer.get("replacement")]

    def offending_kernels(self) -> list[str]:
        """Kernel classes still failing, as --deny-kernel takes them (a dispatcher with parts)."""
        names: list[str] = []
        for layer in self.layers:
            if layer["verdict"] in FAILING:
                kernel = layer["kernel"]
                names.append(kernel.split("[")[0])
                if "[" in kernel:
                    names.extend(kernel[kernel.index("[") + 1:].rstrip("]").split("|"))
        return list(dict.fromkeys(names))

    def seconds(self) -> float:
        return max((rank["seconds"] for rank in self.ranks), default=0.0)

    def as_dict(self) -> dict[str, Any]:
        sample = sum(rank["sample_bytes"] for rank in self.ranks)
        weights = sum(rank["model_bytes"] for rank in self.ranks)
        return {
            "passed": self.passed,
            "complete": self.complete,
            "policy": self.policy,
            "unchecked_policy": self.unchecked_policy,
            "action": self.action,
            "refusal": self.refusal,
            "counts": self.counts(),
            "duration_seconds": self.seconds(),
            "sample_bytes": sample,
            "model_bytes": weights,
            "sample_fraction": sample / weights if weights else 0.0,
            "replacements": self.replacements(),
            "offending_kernels": self.offending_kernels(),
            "unchecked": [{"layer": layer["layer"], "reason": layer["reason"]}
                          for layer in self.layers if layer["verdict"] == "unchecked"],
            "summary": summary(self),
            "ranks": self.ranks,
        }


def _bits(value: Any) -> str:
    return "non-finite" if value is None else f"{value}"


def summary(outcome: Outcome) -> str:
    """A one-screen report: failing, replaced and unchecked layers, and what to do."""
    counts = outcome.counts()
    state = "complete" if outcome.complete else f"INCOMPLETE: {counts['unchecked']} unchecked"
    lines = [
        f"gemmguard self-check: {counts['pass']} passed, {counts['degraded']} degraded, "
        f"{counts['broken']} broken, {counts['unchecked']} unchecked ({state}; "
        f"{outcome.seconds():.2f}s, policy {outcome.policy})."
    ]
    for layer in outcome.layers:
        if layer["verdict"] in FAILING:
            if layer["bits"] is None:
                what = "gives non-finite output (NaN/Inf)"
            else:
                what = (f"gives {layer['bits']} bits where the {layer['scheme']} scheme allows "
                        f"{_bits(layer['expected_bits'])} (excess {layer['excess_bits']} bits)")
            experts = [f"{e['expert']} {e['verdict']}" for e in layer.get("experts") or ()
                       if e.get("verdict") in FAILING]
            if experts:
                what += "; experts " + ", ".join(experts)
            lines.append(f"  {layer['verdict']:8} {layer['layer']}: {layer['kernel']} {what}")
    for item in outcome.replacements():
        if item.get("kernel"):
            lines.append(f"  replaced {item['layer']}: {item['rejected']} "
                         f"({item['rejected_verdict']}, excess "
                         f"{_bits(item['rejected_excess_bits'])} bits) → {item['kernel']} "
                         f"({item['cost_ratio']}x its time)")
    unchecked = [layer for layer in outcome.layers if layer["verdict"] == "unchecked"]
    for layer in unchecked[:10]:
        lines.append(f"  unchecked {layer['layer']} ({layer['scheme']}, {layer['kernel']}): "
                     f"{layer['reason']}")
    if len(unchecked) > 10:
        lines.append(f"  … and {len(unchecked) - 10} more unchecked layers")
    if outcome.refusal:
        lines.append(f"  Refused: {outcome.refusal}.")
    if not outcome.passed:
        options = " ".join(f"--deny-kernel {name}" for name in outcome.offending_kernels())
        lines.append(f"  Avoid these kernels with: gemmguard serve … {options}")
    return "\n".join(lines)
