"""Faults are injected, never assumed: honest kernels pass, faulty ones are caught."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from gemmguard import numerics
from gemmguard.kernels import faulty
from gemmguard.selfcheck import measure
from gemmguard.selfcheck.sample import LinearSample, sample_rows
from gemmguard.selfcheck.schemes import Activation

N, K = 512, 256


def _checkpoint(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * K**-0.5
    return numerics.quantize_fp8_block(weight)


def _layer(apply):  # type: ignore[no-untyped-def]
    method = SimpleNamespace(apply=lambda module, x: apply(x))
    return SimpleNamespace(quant_method=method, weight=None)


def _sample(q: torch.Tensor, scale: torch.Tensor) -> LinearSample:
    rows = sample_rows(N)
    weight = numerics.dequantize_fp8_block(q, scale)[rows]
    return LinearSample("layer", "fp8-block", rows, weight, Activation("group", 128),
                        torch.bfloat16)


def _check(layer, sample, seed=0):  # type: ignore[no-untyped-def]
    return measure.check_linear(layer, sample, "kernel-under-test", "linear", seed)


def _kernels(q: torch.Tensor, scale: torch.Tensor) -> dict[str, object]:
    deq = numerics.dequantize_fp8_block(q, scale)
    e8m0 = faulty.e8m0_requantize(q, scale, (128, 128))

    def corrupt(x: torch.Tensor) -> torch.Tensor:
        out = (x.float() @ deq.t()).bfloat16()
        out[:, 128:256] = out[:, 128:256].flip(-1)
        return out

    return {
        "dequant-bf16": lambda x: torch.nn.functional.linear(x, deq.bfloat16()),
        "emulated-w8a8": lambda x: (numerics.fake_quantize_fp8_groups(x) @ deq.t()).bfloat16(),
        "e8m0": lambda x: (faulty.e8m0_activations(x, 128) @ e8m0.t()).bfloat16(),
        "garbage": lambda x: torch.randn(x.shape[0], N).bfloat16(),
        "corrupt-block": corrupt,
    }


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("kernel", ["dequant-bf16", "emulated-w8a8"])
def test_honest_kernels_pass_over_seeds(kernel: str, seed: int) -> None:
    q, scale = _checkpoint(seed)
    result = _check(_layer(_kernels(q, scale)[kernel]), _sample(q, scale), seed)
    assert result.verdict == "pass", result
    assert result.excess_bits < measure.DEGRADED_EXCESS_BITS


def test_e8m0_requantization_is_degraded_not_broken() -> None:
    q, scale = _checkpoint(0)
    result = _check(_layer(_kernels(q, scale)["e8m0"]), _sample(q, scale))
    assert result.verdict == "degraded", result
    # The H100 measured ~0.5 bit on a real checkpoint; this random one loses about 1-1.8.
    assert 0.3 < result.excess_bits < 2.0


@pytest.mark.parametrize("kernel", ["garbage", "corrupt-block"])
def test_garbage_and_one_corrupt_block_are_broken(kernel: str) -> None:
    q, scale = _checkpoint(0)
    result = _check(_layer(_kernels(q, scale)[kernel]), _sample(q, scale))
    assert result.verdict == "broken", result
    assert result.worst_block_error >= measure.BROKEN_RELATIVE_ERROR


def test_non_finite_output_is_broken() -> None:
    q, scale = _checkpoint(0)
    result = _check(_layer(lambda x: torch.full((x.shape[0], N), float("nan"))),
                    _sample(q, scale))
    assert result.verdict == "broken"
    assert result.reason == measure.NON_FINITE_OUTPUT
    # No NaN or Inf ever reaches JSON: non-finite measurements are reported as null.
    assert result.bits is None and result.excess_bits is None
    json.dumps(result.as_dict(), allow_nan=False)


def test_finite_output_where_the_checkpoint_defines_none_is_broken() -> None:
    # Measured on the H200 (vLLM 0.26): a router stored in bf16 under an FP8 config that does
    # not exclude it gets an fp8 parameter and never-written scales; its reference is not
    # finite, yet it computes finite values and serves them. That is broken, not unchecked.
    q, scale = _checkpoint(0)
    scale[0, 0] = float("nan")
    result = _check(_layer(_kernels(q, scale)["garbage"]), _sample(q, scale))
    assert result.verdict == "broken"
    assert result.reason == measure.UNDEFINED_BY_CHECKPOINT.format(what="not finite")
    json.dumps(result.as_dict(), allow_nan=False)


def test_a_zero_reference_with_a_non_zero_output_is_broken() -> None:
    q, scale = _checkpoint(0)
    sample = _sample(q, scale)
    sample.weight.zero_()
    result = _check(_layer(_kernels(q, scale)["dequant-bf16"]), sample)
    assert result.verdict == "broken"
    assert result.reason == measure.UNDEFINED_BY_CHECKPOINT.format(what="zero")


def test_non_finite_output_is_broken_whatever_the_reference() -> None:
    """The case the H200 router run served: NaN out of the kernel, NaN in the reference."""
    q, scale = _checkpoint(0)
    scale[0, 0] = float("nan")
    result = _check(_layer(lambda x: torch.full((x.shape[0], N), float("nan"))),
                    _sample(q, scale))
    assert result.verdict == "broken"
    assert result.reason == measure.NON_FINITE_OUTPUT


def test_only_an_undefined_reference_and_a_zero_output_stay_unchecked() -> None:
    q, scale = _checkpoint(0)
    sample = _sample(q, scale)
    sample.weight.zero_()
    result = _check(_layer(lambda x: torch.zeros(x.shape[0], N)), sample)
    assert result.verdict == "unchecked"
    assert result.reason == "reference is zero"
    scale[0, 0] = float("nan")
    result = _check(_layer(lambda x: torch.zeros(x.shape[0], N)), _sample(q, scale))
    assert result.verdict == "unchecked"
    assert result.reason == measure.NON_FINITE_REFERENCE


def test_verdict_thresholds() -> None:
    assert measure.verdict(6.0, 0.1, 0.01) == "pass"
    assert measure.verdict(6.0, 0.3, 0.01) == "degraded"
    assert measure.verdict(6.0, 0.3, 0.3) == "broken"
    # 2^-1.5 ≈ 0.35 relative error: broken when the scheme allows better, not when it does not
    assert measure.verdict(1.5, 0.3, 0.01) == "broken"
    assert measure.verdict(1.5, 0.0, 0.01) == "pass"
    # Too few outputs to tell a fraction of a bit: only broken counts.
    assert measure.verdict(6.0, 0.3, 0.01, enough_values=False) == "pass"
    assert measure.verdict(1.5, 0.3, 0.01, enough_values=False) == "broken"


def test_activations_are_drawn_once_per_shape_and_each_caller_gets_its_own() -> None:
    # Layers of one shape share one draw (an 8B model: 4 shapes, 32 layers each); what a caller
    # gets is its own: a kernel that writes into its input changes nothing for the next layer.
    measure.forget_activations()
    first = measure.activations(16, 256, torch.bfloat16, 3)
    first.mul_(0)
    again = measure.activations(16, 256, torch.bfloat16, 3)
    assert again.abs().sum() > 0
    assert measure._drawn.cache_info().misses == 1 and measure._drawn.cache_info().hits == 1
    measure.forget_activations()
    fresh = measure.activations(16, 256, torch.bfloat16, 3)
    assert torch.equal(fresh, again)  # the same seeded values, drawn again
