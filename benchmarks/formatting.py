"""How numbers read in the report: ratios with their spread, durations, bytes, tables."""

from __future__ import annotations

from typing import Any

from benchmarks.stats import is_number

NA = "n/a"


def median(value: Any) -> Any:
    """The median of a spread dict, or the value itself."""
    return value.get("median") if isinstance(value, dict) else value


def x(value: Any) -> str:
    """A ratio: `1.003×`, or with its spread over rounds `1.003× (0.991–1.012)`."""
    if isinstance(value, dict):
        if not is_number(value.get("median")):
            return NA
        if value.get("n", 1) > 1:
            return f"{value['median']:.3f}× ({value['low']:.3f}–{value['high']:.3f})"
        return f"{value['median']:.3f}×"
    return f"{value:.3f}×" if is_number(value) else NA


def secs(value: Any, unit: str = "s") -> str:
    """Seconds (or milliseconds with unit='ms'); a spread shows its median and range."""
    scale = 1000.0 if unit == "ms" else 1.0
    digits = 1 if unit == "ms" else 2
    if isinstance(value, dict):
        if not is_number(value.get("median")):
            return NA
        text = f"{value['median'] * scale:.{digits}f} {unit}"
        if value.get("n", 1) > 1:
            text += f" ({value['low'] * scale:.{digits}f}–{value['high'] * scale:.{digits}f})"
        return text
    return f"{value * scale:.{digits}f} {unit}" if is_number(value) else NA


def dur(value: Any) -> str:
    """A short duration in the unit that suits it: µs, ms or s."""
    if not is_number(value):
        return NA
    if value < 1e-3:
        return f"{value * 1e6:.1f} µs"
    if value < 1:
        return f"{value * 1e3:.2f} ms"
    return f"{value:.2f} s"


def mib(value: Any) -> str:
    """Bytes in MiB (a spread shows its median)."""
    value = median(value)
    return f"{value / 2**20:,.0f} MiB" if is_number(value) else NA


def num(value: Any, digits: int = 1) -> str:
    """A number with thousands separators (a spread shows its median)."""
    value = median(value)
    return f"{value:,.{digits}f}" if is_number(value) else NA


def pct(value: Any, digits: int = 1) -> str:
    """A fraction as a percentage (a spread shows its median)."""
    value = median(value)
    return f"{100 * value:.{digits}f}%" if is_number(value) else NA


def verdict(value: bool | None) -> str:
    """A goal's verdict: met, NOT met, or n/a when there was nothing to judge."""
    return NA if value is None else ("met" if value else "NOT met")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines
