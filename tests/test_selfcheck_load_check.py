"""What the check at load decides when a failing kernel cannot be replaced in place."""

from __future__ import annotations

import pytest

from gemmguard.errors import SelfcheckFailed
from gemmguard.selfcheck.load_check import CheckConfig, LayerCheck, RankCheck, finish, refusal
from gemmguard.selfcheck.measure import LayerResult

EXPERTS = "TritonExperts"


def _broken(layer: str, kernel: str) -> LayerResult:
    return LayerResult(layer, "moe", kernel, "fp8-block", "broken", bits=0.5,
                       expected_bits=6.0, excess_bits=5.5)


def test_an_unswappable_failing_kernel_refuses_with_the_kernel_to_deny_and_no_restart() -> None:
    check = RankCheck(CheckConfig(policy="fallback"))
    result = _broken("model.layers.0.mlp.experts", EXPERTS)
    LayerCheck(check, result.layer, None, "moe", None)._unswappable(result)
    check.layers.append(result)

    assert result.replacement is not None
    assert result.replacement["swappable"] is False and result.replacement["kernel"] is None
    assert result.replacement["rejected"] == EXPERTS
    assert f"--deny-kernel {EXPERTS}" in result.reason
    why = refusal(check)
    assert "cannot be swapped in place (TritonExperts)" in why
    assert "no kernel vLLM offers" not in why
    with pytest.raises(SelfcheckFailed) as refused:  # start-up stops in the loader
        finish(check, 0)
    assert "cannot be swapped in place" in str(refused.value)
    assert f"--deny-kernel {EXPERTS}" in str(refused.value)


def test_a_layer_without_a_passing_candidate_is_named_apart_from_an_unswappable_one() -> None:
    check = RankCheck(CheckConfig(policy="fallback"))
    unswappable = _broken("model.layers.0.mlp.experts", EXPERTS)
    LayerCheck(check, unswappable.layer, None, "moe", None)._unswappable(unswappable)
    no_candidate = _broken("model.layers.0.mlp.down_proj", "GarbageFp8BlockKernel")
    no_candidate.replacement = {"rejected": no_candidate.kernel, "kernel": None,
                                "candidates": []}
    check.layers += [unswappable, no_candidate]

    why = refusal(check)
    assert "1 layer(s) failed with a kernel that cannot be swapped in place" in why
    assert "1 layer(s) failed and no kernel vLLM offers could replace theirs in place" in why


def test_warn_keeps_a_failing_kernel_and_does_not_refuse() -> None:
    check = RankCheck(CheckConfig(policy="warn"))
    check.layers.append(_broken("model.layers.0.mlp.experts", EXPERTS))
    assert refusal(check) == ""
