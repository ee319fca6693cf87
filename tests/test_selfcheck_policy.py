"""What the ranks' reports add up to: counts, completeness, refusal, and the report text."""

from __future__ import annotations

import json

from gemmguard.selfcheck.policy import Outcome, summary


def _rank(*verdicts: str, refusal: str = "") -> dict:  # type: ignore[type-arg]
    layers = [{"layer": f"l{i}", "layer_type": "linear",
               "kernel": "K[A|B]" if v != "pass" else "Good", "scheme": "fp8-block",
               "bits": 4.5 if v != "unchecked" else None,
               "expected_bits": 5.5 if v != "unchecked" else None,
               "excess_bits": 1.0 if v != "unchecked" else None,
               "verdict": v, "reason": "no reference for scheme w4a16" if v == "unchecked"
               else "", "replacement": None, "experts": []}
              for i, v in enumerate(verdicts)]
    return {"rank": 0, "seconds": 0.1, "sample_bytes": 10, "model_bytes": 2000,
            "refusal": refusal, "layers": layers}


def test_passing_outcome_serves() -> None:
    outcome = Outcome("fallback", [_rank("pass", "pass")])
    assert outcome.passed and outcome.complete and outcome.serves
    assert outcome.action == "serve"


def test_an_incomplete_check_is_not_passed_and_serves_as_incomplete() -> None:
    outcome = Outcome("fallback", [_rank("pass", "unchecked")])
    assert not outcome.complete and not outcome.passed and not outcome.failing
    assert outcome.serves and outcome.action == "serve-incomplete"
    assert "Not passed: an incomplete check is not a pass" in summary(outcome)
    assert "--deny-kernel" not in summary(outcome)  # no kernel to avoid: none failed
    empty = Outcome("fallback", [_rank()])
    assert not empty.passed and not empty.complete
    assert "INCOMPLETE: no GEMM-owning layer was checked" in summary(empty)


def test_layers_the_check_never_saw_are_counted_and_named() -> None:
    rank = _rank("pass", "unchecked")
    rank["layers"][1].update(seen=False, reason="not seen by the check (loader gguf)")
    rank.update(modules_held=2, modules_seen=1, modules_checked=1)
    body = Outcome("fallback", [rank, {**rank, "rank": 1}]).as_dict()
    assert (body["modules_held"], body["modules_seen"], body["modules_checked"]) == (4, 2, 2)
    assert "INCOMPLETE: 2 unchecked, 2 of them not seen by the check" in body["summary"]
    assert "not seen by the check (loader gguf)" in body["summary"]


def test_a_failing_kernel_is_rejected_unless_the_policy_serves_it() -> None:
    assert Outcome("warn", [_rank("pass", "degraded")]).rejected() == []
    assert Outcome("fail", [_rank("pass", "degraded")]).rejected() == [("K[A|B]", "degraded")]
    rank = _rank("pass", "pass")
    rank["layers"][1]["replacement"] = {"rejected": "Bad", "rejected_verdict": "broken",
                                        "kernel": "Good"}
    assert Outcome("fallback", [rank]).rejected() == [("Bad", "broken")]


def test_an_unchecked_layer_never_gives_passed_and_complete() -> None:
    outcome = Outcome("fallback", [_rank("pass", "unchecked")])
    assert not outcome.complete
    body = outcome.as_dict()
    assert body["counts"]["unchecked"] == 1
    assert body["unchecked"] == [{"layer": "l1", "reason": "no reference for scheme w4a16"}]
    assert "INCOMPLETE: 1 unchecked" in body["summary"]
    assert "unchecked l1 (fp8-block, K[A|B]): no reference for scheme w4a16" in body["summary"]
    json.dumps(body, allow_nan=False)  # nothing non-finite reaches JSON


def test_warn_serves_degraded_and_a_rank_refusal_refuses() -> None:
    assert Outcome("warn", [_rank("pass", "degraded")]).action == "serve-degraded"
    refused = Outcome("fail", [_rank("degraded", refusal="1 layer(s) failed")])
    assert refused.action == "refuse" and not refused.serves


def test_report_names_layers_kernels_bits_and_the_option_that_avoids_them() -> None:
    outcome = Outcome("warn", [_rank("pass", "degraded")])
    text = summary(outcome)
    assert "1 passed, 1 degraded, 0 broken, 0 unchecked" in text
    assert "l1: K[A|B] gives 4.5 bits where the fp8-block scheme allows 5.5" in text
    assert "--deny-kernel K --deny-kernel A --deny-kernel B" in text
    body = outcome.as_dict()
    assert body["sample_fraction"] == 10 / 2000
    assert body["offending_kernels"] == ["K", "A", "B"]


def test_report_names_the_failing_experts_of_an_moe_layer() -> None:
    rank = _rank("pass", "broken")
    rank["layers"][1].update(layer_type="moe", experts=[
        {"expert": 0, "verdict": "broken", "bits": 0.1, "expected_bits": 7.0,
         "excess_bits": 6.9},
        {"expert": 6, "verdict": "pass", "bits": 7.0, "expected_bits": 7.0, "excess_bits": 0.0}])
    text = summary(Outcome("fail", [rank]))
    assert ("l1: K[A|B] gives 4.5 bits where the fp8-block scheme allows 5.5 (excess 1.0 "
            "bits); experts 0 broken") in text
    assert "6 pass" not in text


def test_a_replaced_moe_layer_names_the_experts_that_failed_its_kernel() -> None:
    # The pooled excess of a layer one expert broke can read 0.0: the experts are the reason.
    rank = _rank("pass", "pass")
    rank["layers"][1].update(layer_type="moe", kernel="CPUExperts", replacement={
        "rejected": "FaultyExperts", "rejected_verdict": "broken", "rejected_excess_bits": 0.0,
        "kernel": "CPUExperts", "cost_ratio": 1.1,
        "rejected_experts": [{"expert": 3, "verdict": "broken", "excess_bits": 6.2}]})
    rank["layers"][0]["replacement"] = {
        "rejected": "Bad", "rejected_verdict": "degraded", "rejected_excess_bits": 0.5,
        "kernel": "Good", "cost_ratio": 1.2, "rejected_experts": []}
    text = summary(Outcome("fallback", [rank]))
    assert ("replaced l1: FaultyExperts (broken: experts 3 broken (excess 6.2 bits)) → "
            "CPUExperts (1.1x its time)") in text
    assert "replaced l0: Bad (degraded, excess 0.5 bits) → Good (1.2x its time)" in text


def test_offline_exit_code_follows_the_unchecked_policy() -> None:
    from gemmguard.selfcheck.policy import exit_code

    assert exit_code(Outcome("warn", [_rank("pass")], "warn")) == 0
    assert exit_code(Outcome("warn", [_rank("pass", "degraded")], "allow")) == 1
    assert exit_code(Outcome("warn", [_rank("pass", "unchecked")], "warn")) == 1
    assert exit_code(Outcome("warn", [_rank("pass", "unchecked")], "allow")) == 0
    assert exit_code(Outcome("fallback", [_rank("unchecked", refusal="unchecked")], "fail")) == 3


def test_an_e8m0_requantization_is_cured_by_turning_deepgemm_off_not_by_denying_the_kernel(
        ) -> None:
    # The H200 run (docs/gpu-proof-moe.md): with DeepGEMM on, vLLM re-quantizes FP8 block
    # experts to E8M0 and TritonExperts then loses 0.7 bit; --deny-kernel TritonExperts only
    # moves the same re-quantized weights to another experts class.
    rank = _rank("pass", "degraded", "broken")
    rank["requant"] = "e8m0"
    rank["layers"][1].update(layer_type="moe", kernel="TritonExperts")
    rank["layers"][2].update(scheme="w4a16-g128", kernel="MacheteLinearKernel")
    outcome = Outcome("fallback", [rank])
    assert outcome.cure() == {"env": {"VLLM_USE_DEEP_GEMM": "0"},
                              "options": ["--deny-kernel", "MacheteLinearKernel"]}
    assert outcome.offending_kernels() == ["MacheteLinearKernel"]
    text = summary(outcome)
    assert ("Avoid these kernels with: VLLM_USE_DEEP_GEMM=0 gemmguard serve … "
            "--deny-kernel MacheteLinearKernel") in text
    assert "--deny-kernel TritonExperts" not in text
    assert outcome.as_dict()["cure"]["env"] == {"VLLM_USE_DEEP_GEMM": "0"}


def test_without_a_requantization_every_failing_kernel_is_denied() -> None:
    for requant in ("", None):
        rank = _rank("pass", "degraded")
        rank["requant"] = requant
        outcome = Outcome("fallback", [rank])
        assert outcome.cure() == {"env": {}, "options": [
            "--deny-kernel", "K", "--deny-kernel", "A", "--deny-kernel", "B"]}
        assert "VLLM_USE_DEEP_GEMM" not in summary(outcome)
    # Only a rank that re-quantized gets the cure: another rank's failing layer is its kernel's.
    e8m0, other = _rank("degraded"), _rank("degraded")
    e8m0["requant"] = "e8m0"
    cure = Outcome("fallback", [e8m0, {**other, "rank": 1}]).cure()
    assert cure["env"] == {"VLLM_USE_DEEP_GEMM": "0"} and "K" in cure["options"]
