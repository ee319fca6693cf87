"""What the self-check's results mean for the server: pass, warn, fall back, or fail."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAILING = ("degraded", "broken")


@dataclass
class Outcome:
    """The whole engine's self-check: every rank's results and what to do about them."""

    policy: str
    ranks: list[dict[str, Any]]
    previous: dict[str, Any] | None = None
    denied_by_selfcheck: list[str] = field(default_factory=list)

    @property
    def layers(self) -> list[dict[str, Any]]:
        return [layer for rank in self.ranks for layer in rank["layers"]]

    def counts(self) -> dict[str, int]:
        counts = {"pass": 0, "degraded": 0, "broken": 0}
        for layer in self.layers:
            counts[layer["verdict"]] += 1
        return counts

    @property
    def passed(self) -> bool:
        return not any(layer["verdict"] in FAILING for layer in self.layers)

    def offending_kernels(self) -> list[str]:
        """Kernel classes of failing layers, the names --deny-kernel takes.

        A kernel that picks a sub-kernel per call ("A[B|C]") is reported with its parts; all
        three are offending, or vLLM would pick the failing part again on its own.
        """
        names: list[str] = []
        for layer in self.layers:
            if layer["verdict"] in FAILING:
                kernel = layer["kernel"]
                names.append(kernel.split("[")[0])
                if "[" in kernel:
                    names.extend(kernel[kernel.index("[") + 1:].rstrip("]").split("|"))
        return list(dict.fromkeys(names))

    @property
    def serves(self) -> bool:
        """Whether the server may take traffic with this outcome."""
        return self.passed or self.policy == "warn"

    @property
    def action(self) -> str:
        if self.passed:
            return "serve"
        if self.policy == "warn":
            return "serve-degraded"
        if self.policy == "fallback" and not self.previous:
            return "fallback"
        return "fail"

    def seconds(self) -> float:
        return max((rank["seconds"] for rank in self.ranks), default=0.0)

    def as_dict(self) -> dict[str, Any]:
        sample = sum(rank["sample_bytes"] for rank in self.ranks)
        weights = sum(rank["model_bytes"] for rank in self.ranks)
        return {
            "passed": self.passed,
            "policy": self.policy,
            "action": self.action,
            "counts": self.counts(),
            "duration_seconds": self.seconds(),
            "sample_bytes": sample,
            "model_bytes": weights,
            "sample_fraction": sample / weights if weights else 0.0,
            "offending_kernels": self.offending_kernels(),
            "summary": summary(self),
            "denied_by_selfcheck": self.denied_by_selfcheck,
            "previous": self.previous,
            "ranks": self.ranks,
        }


def summary(outcome: Outcome) -> str:
    """A one-screen report: failing layers with kernel and bits, and the option that avoids them."""
    counts = outcome.counts()
    lines = [
        f"gemmguard self-check: {counts['pass']} passed, {counts['degraded']} degraded, "
        f"{counts['broken']} broken ({outcome.seconds():.2f}s, policy {outcome.policy})."
    ]
    for layer in outcome.layers:
        if layer["verdict"] in FAILING:
            lines.append(
                f"  {layer['verdict']:8} {layer['layer']}: {layer['kernel']} gives "
                f"{layer['bits']} bits where the {layer['scheme']} scheme allows "
                f"{layer['expected_bits']} (excess {layer['excess_bits']} bits)"
            )
    if not outcome.passed:
        options = " ".join(f"--deny-kernel {name}" for name in outcome.offending_kernels())
        lines.append(f"  Avoid these kernels with: gemmguard serve … {options}")
    return "\n".join(lines)


def write_report(path: str, outcome: Outcome) -> None:
    """Leave the report for `gemmguard serve`, which restarts or exits on it."""
    if path:
        Path(path).write_text(json.dumps(outcome.as_dict(), indent=1))


def read_report(path: str) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None
