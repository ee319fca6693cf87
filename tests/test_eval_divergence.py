"""Agreement, first divergence and top-k KL on hand-made distributions with known answers."""

from __future__ import annotations

import math
import random

import pytest

from gemmguard.evaluation.divergence import (
    Step,
    compare,
    first_divergence,
    summarize,
    top_k_kl,
    top_k_overlap,
)


def _lp(probs: dict[str, float]) -> dict[str, float]:
    return {t: math.log(p) for t, p in probs.items()}


def _exact_kl(p: dict[str, float], q: dict[str, float]) -> float:
    return sum(pv * math.log(pv / q[t]) for t, pv in p.items() if pv > 0)


def test_identical_top_k_gives_zero() -> None:
    top = _lp({"a": 0.5, "b": 0.2, "c": 0.1})
    assert top_k_kl(top, dict(top)) == 0.0
    assert top_k_overlap(top, dict(top)) == 1.0


def test_full_vocabulary_gives_the_exact_kl() -> None:
    p, q = {"a": 0.7, "b": 0.3}, {"a": 0.5, "b": 0.5}
    expected = 0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)
    assert top_k_kl(_lp(p), _lp(q)) == pytest.approx(expected, rel=1e-12)


def test_rest_bucket_carries_the_mass_outside_the_top_k() -> None:
    # Shared tokens a, b; the rest is 0.2 for the reference and 0.4 for the candidate.
    ref, cand = _lp({"a": 0.5, "b": 0.3}), _lp({"a": 0.5, "b": 0.1})
    expected = 0.3 * math.log(0.3 / 0.1) + 0.2 * math.log(0.2 / 0.4)
    assert top_k_kl(ref, cand) == pytest.approx(expected, rel=1e-12)


def test_top_k_is_not_renormalised() -> None:
    # Renormalising each side's single token to 1 would hide that the candidate doubled it.
    ref, cand = _lp({"a": 0.4}), _lp({"a": 0.8})
    expected = 0.4 * math.log(0.4 / 0.8) + 0.6 * math.log(0.6 / 0.2)
    assert top_k_kl(ref, cand) == pytest.approx(expected, rel=1e-12)


def test_estimate_is_a_lower_bound_of_the_true_kl_and_tightens_with_k() -> None:
    rng = random.Random(7)
    vocab = [f"t{i}" for i in range(50)]
    for _ in range(200):
        p = [rng.random() ** 3 for _ in vocab]
        q = [x * math.exp(rng.gauss(0, 0.3)) for x in p]
        p_full = {t: v / sum(p) for t, v in zip(vocab, p, strict=True)}
        q_full = {t: v / sum(q) for t, v in zip(vocab, q, strict=True)}
        true_kl = _exact_kl(p_full, q_full)
        previous = -1.0
        for k in (1, 5, 20, 50):
            ref = _lp(dict(sorted(p_full.items(), key=lambda kv: -kv[1])[:k]))
            cand = _lp(dict(sorted(q_full.items(), key=lambda kv: -kv[1])[:k]))
            estimate = top_k_kl(ref, cand)
            assert 0.0 <= estimate <= true_kl + 1e-12
            if k == 50:
                assert estimate == pytest.approx(true_kl, rel=1e-9)
            previous = estimate
        assert previous > 0.0


def test_disjoint_top_k_sets_give_zero_and_zero_overlap() -> None:
    # The documented weakness of the lower bound; top_k_overlap exposes it.
    ref, cand = _lp({"a": 0.6}), _lp({"b": 0.6})
    assert top_k_kl(ref, cand) == 0.0
    assert top_k_overlap(ref, cand) == 0.0


def test_top_k_summing_above_one_by_rounding_stays_finite_and_non_negative() -> None:
    ref = {"a": math.log(0.6000001), "b": math.log(0.4000001)}
    cand = {"a": math.log(0.6), "b": math.log(0.4)}
    value = top_k_kl(ref, cand)
    assert math.isfinite(value) and 0.0 <= value < 1e-6


def test_first_divergence() -> None:
    assert first_divergence(["a", "b", "c"], ["a", "b", "c"]) is None
    assert first_divergence(["a", "x", "c"], ["a", "b", "c"]) == 1
    assert first_divergence(["a", "b"], ["a", "b", "c"]) == 2
    assert first_divergence([], []) is None


def _steps(tokens: str, probs: dict[str, float] | None = None) -> list[Step]:
    top = _lp(probs or {"a": 0.5, "b": 0.3})
    return [Step(t, top) for t in tokens]


def test_compare_counts_agreement_over_the_longer_side_and_kl_up_to_divergence() -> None:
    cand = _steps("abcxe", {"a": 0.5, "b": 0.3})
    ref = _steps("abcdef", {"a": 0.5, "b": 0.1})
    result = compare(cand, ref)
    assert result.first_divergence == 3
    assert result.matched == 4  # a, b, c and the e at position 4; x != d
    assert result.positions == 6  # the reference is longer; its last token has no partner
    assert result.agreement == pytest.approx(4 / 6)
    # Positions 0..3: equal contexts, including the divergence itself.
    assert len(result.kl) == 4 and len(result.overlap) == 4
    expected = 0.1 * math.log(0.1 / 0.3) + 0.4 * math.log(0.4 / 0.2)
    assert result.kl == pytest.approx((expected,) * 4)


def test_identical_generations_agree_fully_with_zero_kl() -> None:
    result = compare(_steps("hello"), _steps("hello"))
    assert (result.agreement, result.first_divergence, result.kl) == (1.0, None, (0.0,) * 5)


def test_summary_pools_positions_across_prompts() -> None:
    same = compare(_steps("aaaa"), _steps("aaaa"))
    diff = compare(_steps("ab", {"a": 0.5}), _steps("ba", {"a": 0.25}))
    summary = summarize([same, diff])
    assert summary.prompts == 2 and summary.identical_prompts == 1
    assert (summary.matched, summary.positions) == (4, 6)
    assert summary.agreement == pytest.approx(4 / 6)
    assert summary.earliest_divergence == 0
    # Four zero-KL positions and one at the divergence.
    kl_diff = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert summary.kl_positions == 5
    assert summary.mean_kl == pytest.approx(kl_diff / 5)
    assert summary.max_kl == pytest.approx(kl_diff)
