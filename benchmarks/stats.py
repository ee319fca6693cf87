"""The few statistics the report needs: percentiles, ratios and their spread over rounds."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100), interpolating linearly between ranks as numpy does."""
    if not values:
        raise ValueError("percentile of no values: measure at least one request first")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q has value {q}; it must be between 0 and 100")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def is_number(value: object) -> bool:
    """True for a finite int or float (bools and NaN excluded)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing, not finite, or the base is 0."""
    if not is_number(numerator) or not is_number(denominator) or denominator == 0:
        return None
    return float(numerator) / float(denominator)  # type: ignore[arg-type]


def geometric_mean(values: Iterable[float | None]) -> float | None:
    """Geometric mean of the positive values given; None when there are none."""
    kept = [v for v in values if is_number(v) and v > 0]  # type: ignore[operator]
    if not kept:
        return None
    return math.exp(sum(math.log(v) for v in kept) / len(kept))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Spread:
    """A value measured in several rounds: its median, lowest and highest, and how many."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Spread | None:
        """The spread of the finite values given; None when there are none."""
        kept = [float(v) for v in values if is_number(v)]  # type: ignore[arg-type]
        if not kept:
            return None
        return cls(percentile(kept, 50), min(kept), max(kept), len(kept))

    @property
    def relative_width(self) -> float | None:
        """(high − low) / median: 0.02 means the rounds disagree by 2% of the value."""
        return ratio(self.high - self.low, self.median)

    def as_dict(self) -> dict[str, Any]:
        return {"median": self.median, "low": self.low, "high": self.high, "n": self.n,
                "relative_width": self.relative_width}


def spread_dict(values: Iterable[float | None]) -> dict[str, Any] | None:
    """`Spread.of(values).as_dict()`, or None when no value is finite."""
    found = Spread.of(values)
    return found.as_dict() if found else None


def latency_summary(latencies: Sequence[float]) -> dict[str, float | None]:
    """p50, p95 and mean of a list of seconds; None for each when the list is empty."""
    if not latencies:
        return {"p50": None, "p95": None, "mean": None}
    return {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
            "mean": sum(latencies) / len(latencies)}


def meets(value: float | None, goal: float, higher_is_better: bool) -> bool | None:
    """Whether a ratio meets its goal (≥ goal, or ≤ goal); None when there is no ratio."""
    if not is_number(value):
        return None
    return bool(value >= goal) if higher_is_better else bool(value <= goal)  # type: ignore[operator]
