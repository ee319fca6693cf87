"""How far two greedy generations of the same prompt differ: token agreement, first divergence, KL.

Each generated position is a `Step`: the chosen token and the server's top-k log-probabilities
(natural log, normalised over the full vocabulary, as vLLM's completions API returns them).
The two sides are the *candidate* (the kernels under test) and the *reference*.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Smallest probability a rest bucket is given: float rounding can make a top-k sum exceed 1.
REST_FLOOR = 1e-12


@dataclass(frozen=True)
class Step:
    """One generated position: the token chosen and the top-k log-probabilities seen there."""

    token: str
    top_logprobs: Mapping[str, float]


def top_k_kl(reference: Mapping[str, float], candidate: Mapping[str, float]) -> float:
    """KL(reference || candidate) in nats, estimated from two top-k log-probability maps.

    Only the top k log-probabilities of each side are known, so the vocabulary is coarse-grained
    into cells whose probability is known exactly on both sides:

    * one cell per token in I = top_k(reference) ∩ top_k(candidate), with p_t = exp(lp_ref[t])
      and q_t = exp(lp_cand[t]);
    * one rest bucket R for every other token, with p_R = 1 - Σ_{t∈I} p_t and likewise q_R.
      This is exact because the log-probabilities are normalised over the whole vocabulary;
      the known top-k values are *not* renormalised to sum to 1, which would hide a change in
      the mass outside them.

    The estimate is Σ_{t∈I} p_t·ln(p_t/q_t) + p_R·ln(p_R/q_R). By the log-sum inequality (data
    processing), coarse-graining can only lose divergence, so the estimate is a lower bound of
    the true KL: never an overstatement, exactly 0 for identical inputs, and exact whenever the
    two distributions agree up to one common factor on the tokens outside I. When the top-k sets
    barely overlap the bound is weak; `top_k_overlap` reports how much they share.
    p_R and q_R are clamped to [REST_FLOOR, 1] against rounding; tokens with p_t = 0 add 0.
    """
    shared = reference.keys() & candidate.keys()
    kl = 0.0
    p_rest = q_rest = 1.0
    for token in shared:
        p = math.exp(reference[token])
        q = math.exp(candidate[token])
        p_rest -= p
        q_rest -= q
        if p > 0.0:
            kl += p * (reference[token] - candidate[token])
    p_rest = min(max(p_rest, REST_FLOOR), 1.0)
    q_rest = min(max(q_rest, REST_FLOOR), 1.0)
    kl += p_rest * math.log(p_rest / q_rest)
    # Rounding in the rest bucket can leave a tiny negative sum; KL itself is never negative.
    return max(kl, 0.0)


def top_k_overlap(reference: Mapping[str, float], candidate: Mapping[str, float]) -> float:
    """|top_k(ref) ∩ top_k(cand)| / max(|top_k(ref)|, |top_k(cand)|); 1.0 when both are empty."""
    size = max(len(reference), len(candidate))
    return 1.0 if size == 0 else len(reference.keys() & candidate.keys()) / size


def first_divergence(candidate: Sequence[str], reference: Sequence[str]) -> int | None:
    """Index of the first position where the token sequences differ (a length mismatch counts);
    None when they are identical."""
    for i, (a, b) in enumerate(zip(candidate, reference, strict=False)):
        if a != b:
            return i
    if len(candidate) != len(reference):
        return min(len(candidate), len(reference))
    return None


@dataclass(frozen=True)
class Comparison:
    """Candidate and reference generations of one prompt, compared."""

    candidate_tokens: tuple[str, ...]
    reference_tokens: tuple[str, ...]
    matched: int
    positions: int
    first_divergence: int | None
    kl: tuple[float, ...]
    overlap: tuple[float, ...]

    @property
    def agreement(self) -> float:
        return 1.0 if self.positions == 0 else self.matched / self.positions


def compare(candidate: Sequence[Step], reference: Sequence[Step]) -> Comparison:
    """Token agreement over all positions, first divergence, and KL where the contexts are equal.

    Agreement counts position i as matched when both sides generated the same token there; the
    positions are the longer side's length, so a side that stopped early counts as mismatched.
    KL and top-k overlap are taken only at positions 0..d, d being the first divergence (or every
    position when there is none): up to and including d both sides saw the same context, so their
    distributions are comparable; after d they continue different texts.
    """
    cand = tuple(s.token for s in candidate)
    ref = tuple(s.token for s in reference)
    matched = sum(1 for a, b in zip(cand, ref, strict=False) if a == b)
    diverged = first_divergence(cand, ref)
    shared = min(len(cand), len(ref))
    last = shared if diverged is None else min(diverged + 1, shared)
    kl = tuple(top_k_kl(reference[i].top_logprobs, candidate[i].top_logprobs) for i in range(last))
    overlap = tuple(
        top_k_overlap(reference[i].top_logprobs, candidate[i].top_logprobs) for i in range(last)
    )
    return Comparison(cand, ref, matched, max(len(cand), len(ref)), diverged, kl, overlap)


@dataclass(frozen=True)
class Summary:
    """Totals over all prompts."""

    prompts: int
    identical_prompts: int
    matched: int
    positions: int
    agreement: float
    mean_kl: float
    max_kl: float
    kl_positions: int
    mean_top_k_overlap: float
    earliest_divergence: int | None


def summarize(comparisons: Sequence[Comparison]) -> Summary:
    """Agreement and mean KL pooled over every position of every prompt (not per-prompt means)."""
    matched = sum(c.matched for c in comparisons)
    positions = sum(c.positions for c in comparisons)
    kl = [v for c in comparisons for v in c.kl]
    overlap = [v for c in comparisons for v in c.overlap]
    divergences = [c.first_divergence for c in comparisons if c.first_divergence is not None]
    return Summary(
        prompts=len(comparisons),
        identical_prompts=sum(1 for c in comparisons if c.first_divergence is None),
        matched=matched,
        positions=positions,
        agreement=1.0 if positions == 0 else matched / positions,
        mean_kl=sum(kl) / len(kl) if kl else 0.0,
        max_kl=max(kl, default=0.0),
        kl_positions=len(kl),
        mean_top_k_overlap=sum(overlap) / len(overlap) if overlap else 1.0,
        earliest_divergence=min(divergences, default=None),
    )
