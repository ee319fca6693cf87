"""benchmarks.stats: percentiles, ratios and spread, checked against values worked by hand."""

from __future__ import annotations

import math

import pytest
from benchmarks.stats import (
    Spread,
    geometric_mean,
    is_number,
    latency_summary,
    meets,
    percentile,
    ratio,
    spread_dict,
)


def test_percentile_interpolates_between_ranks_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # sorted: 1 2 3 4
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 95) == pytest.approx(3.85)  # 3 + 0.85 × (4 − 3)
    assert percentile([7.0], 95) == 7.0


def test_percentile_matches_nearest_rank_for_odd_counts() -> None:
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0
    assert percentile(list(map(float, range(101))), 95) == 95.0


@pytest.mark.parametrize("q", [-1, 101])
def test_percentile_rejects_q_outside_0_to_100(q: float) -> None:
    with pytest.raises(ValueError, match=f"value {q}"):
        percentile([1.0], q)


def test_percentile_of_nothing_says_so() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_ratio_is_none_when_it_cannot_be_taken() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(0.0, 2.0) == 0.0
    assert ratio(1.0, 0.0) is None
    assert ratio(None, 2.0) is None
    assert ratio(1.0, None) is None
    assert ratio(math.nan, 1.0) is None
    assert ratio(1.0, math.inf) is None


def test_is_number_excludes_bools_and_non_finite() -> None:
    assert is_number(1) and is_number(0.5)
    assert not is_number(True)
    assert not is_number(math.nan)
    assert not is_number("1")
    assert not is_number(None)


def test_spread_is_median_low_high_of_the_finite_values() -> None:
    spread = Spread.of([1.02, None, 0.98, 1.00, math.nan])
    assert spread == Spread(median=1.00, low=0.98, high=1.02, n=3)
    assert spread.relative_width == pytest.approx(0.04)
    assert Spread.of([None, math.nan]) is None


def test_spread_dict_carries_its_relative_width() -> None:
    found = spread_dict([2.0, 4.0])
    assert found == {"median": 3.0, "low": 2.0, "high": 4.0, "n": 2,
                     "relative_width": pytest.approx(2 / 3)}
    assert spread_dict([]) is None


def test_geometric_mean_keeps_positive_finite_values() -> None:
    assert geometric_mean([2.0, 8.0]) == pytest.approx(4.0)
    assert geometric_mean([2.0, None, -1.0, 8.0]) == pytest.approx(4.0)
    assert geometric_mean([None]) is None


def test_latency_summary() -> None:
    summary = latency_summary([0.1, 0.2, 0.3, 0.4])
    assert summary["p50"] == pytest.approx(0.25)
    assert summary["p95"] == pytest.approx(0.385)
    assert summary["mean"] == pytest.approx(0.25)
    assert latency_summary([]) == {"p50": None, "p95": None, "mean": None}


def test_meets_in_both_directions() -> None:
    assert meets(0.99, 0.99, higher_is_better=True) is True
    assert meets(0.989, 0.99, higher_is_better=True) is False
    assert meets(1.01, 1.01, higher_is_better=False) is True
    assert meets(1.02, 1.01, higher_is_better=False) is False
    assert meets(None, 1.01, higher_is_better=False) is None
