"""benchmarks.formatting: how ratios, durations and bytes read in the report."""

from __future__ import annotations

import math
from typing import Any

import pytest
from benchmarks.formatting import dur, mib, pct, secs, table, verdict, x


@pytest.mark.parametrize("value, text", [
    (1.0, "1.000×"), (None, "n/a"), (math.nan, "n/a"),
    ({"median": 1.0, "low": 0.9, "high": 1.1, "n": 3}, "1.000× (0.900–1.100)"),
    ({"median": 1.0, "low": 1.0, "high": 1.0, "n": 1}, "1.000×"),
])
def test_ratio_format(value: Any, text: str) -> None:
    assert x(value) == text


def test_duration_format_picks_its_unit() -> None:
    assert (dur(2.5e-5), dur(2.5e-3), dur(2.5), dur(None)) == ("25.0 µs", "2.50 ms", "2.50 s",
                                                               "n/a")


def test_seconds_with_and_without_spread() -> None:
    assert secs(1.234) == "1.23 s"
    assert secs({"median": 0.1, "low": 0.05, "high": 0.2, "n": 3}, "ms") == \
        "100.0 ms (50.0–200.0)"
    assert secs({"median": None}) == "n/a"


def test_bytes_percent_verdict_and_table() -> None:
    assert mib(3 * 2**20) == "3 MiB" and mib({"median": 2**30, "n": 1}) == "1,024 MiB"
    assert pct(0.0123) == "1.2%" and pct(None) == "n/a"
    assert (verdict(True), verdict(False), verdict(None)) == ("met", "NOT met", "n/a")
    assert table(["a", "b"], [["1", "2"]]) == ["| a | b |", "|---|---|", "| 1 | 2 |"]
