"""What each policy does with a self-check outcome, and the report it gives."""

from __future__ import annotations

from gemmguard.selfcheck.policy import Outcome, summary


def _rank(*verdicts: str) -> dict:  # type: ignore[type-arg]
    layers = [{"layer": f"l{i}", "kernel": "K[A|B]" if v != "pass" else "Good",
               "scheme": "fp8-block", "bits": 4.5, "expected_bits": 5.5, "excess_bits": 1.0,
               "verdict": v}
              for i, v in enumerate(verdicts)]
    return {"rank": 0, "seconds": 0.1, "sample_bytes": 10, "model_bytes": 2000, "layers": layers}


def test_passing_outcome_serves_under_every_policy() -> None:
    for policy in ("warn", "fallback", "fail"):
        outcome = Outcome(policy, [_rank("pass", "pass")])
        assert outcome.passed and outcome.serves and outcome.action == "serve"


def test_failing_outcome_per_policy() -> None:
    ranks = [_rank("pass", "degraded", "broken")]
    assert Outcome("warn", ranks).action == "serve-degraded"
    assert Outcome("warn", ranks).serves
    assert Outcome("fallback", ranks).action == "fallback"
    assert Outcome("fallback", ranks, previous={"passed": False}).action == "fail"
    assert Outcome("fail", ranks).action == "fail"
    assert not Outcome("fail", ranks).serves


def test_report_names_layers_kernels_bits_and_the_option_that_avoids_them() -> None:
    outcome = Outcome("fail", [_rank("pass", "degraded")])
    text = summary(outcome)
    assert "1 passed, 1 degraded, 0 broken" in text
    assert "l1: K[A|B] gives 4.5 bits where the fp8-block scheme allows 5.5" in text
    assert "--deny-kernel K --deny-kernel A --deny-kernel B" in text
    body = outcome.as_dict()
    assert body["sample_fraction"] == 10 / 2000
    # A per-call dispatcher fails through its parts too: deny them all, or vLLM re-picks one.
    assert body["offending_kernels"] == ["K", "A", "B"]
