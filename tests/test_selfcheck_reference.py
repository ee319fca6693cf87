"""Checkpoint formats and reference GEMMs, tested on their own against hand-built layers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gemmguard import numerics
from gemmguard.selfcheck import reference, schemes
from gemmguard.selfcheck.sample import LinearSample, MoeSample, sample_rows
from gemmguard.selfcheck.schemes import Activation

GEN = torch.Generator().manual_seed(0)


def test_fp8_block_rows_dequantize_to_the_checkpoint_values() -> None:
    weight = torch.randn(256, 384, generator=GEN)
    q, scale = numerics.quantize_fp8_block(weight)
    module = SimpleNamespace(weight=q, weight_scale_inv=scale)
    fmt = schemes.ScaledFormat("fp8", (128, 128))
    rows = sample_rows(256)
    assert torch.equal(fmt.rows(module, rows), numerics.dequantize_fp8_block(q, scale)[rows])


def test_extreme_rows_sit_in_the_blocks_with_the_smallest_and_largest_scales() -> None:
    weight = torch.randn(512, 256, generator=GEN)
    weight[128:256] *= 1e-3  # block-row 1: tiny scales
    weight[384:512] *= 1e3  # block-row 3: huge scales
    q, scale = numerics.quantize_fp8_block(weight)
    fmt = schemes.ScaledFormat("fp8", (128, 128))
    blocks = {row // 128 for row in fmt.extreme_rows(SimpleNamespace(weight=q,
                                                                      weight_scale_inv=scale))}
    assert {1, 3} <= blocks


def test_fp8_per_tensor_merged_layer_keeps_one_scale_per_shard() -> None:
    q = (torch.randn(384, 128, generator=GEN) * 50).to(torch.float8_e4m3fn)
    module = SimpleNamespace(weight=q, weight_scale=torch.tensor([0.5, 2.0, 8.0]),
                             logical_widths=[128, 128, 128])
    rows = torch.tensor([0, 200, 300])
    got = schemes.ScaledFormat("fp8", None).rows(module, rows)
    assert torch.equal(got, q.float()[rows] * torch.tensor([[0.5], [2.0], [8.0]]))


def test_weights_that_do_not_match_the_scheme_are_unchecked_with_the_reason() -> None:
    module = SimpleNamespace(weight=torch.randn(256, 128).bfloat16(),
                             weight_scale_inv=torch.ones(2, 1))
    with pytest.raises(schemes.Unchecked, match="do not match the declared scheme"):
        schemes.ScaledFormat("fp8", (128, 128)).rows(module, torch.tensor([0]))
    with pytest.raises(schemes.Unchecked, match="no reference for scheme w9a9"):
        schemes.linear_format("w9a9", None)


def test_ideal_quantizes_activations_as_the_scheme_says() -> None:
    weight = torch.randn(8, 256, generator=GEN)
    x = torch.randn(4, 256, generator=GEN)
    sample = LinearSample("l", "fp8-block", torch.arange(8), weight, Activation("group", 128),
                          torch.float32)
    expected = numerics.fake_quantize_fp8_groups(x, 128) @ weight.t()
    assert torch.equal(reference.ideal(sample, x), expected)
    assert torch.equal(reference.exact(sample, x), x @ weight.t())


def test_moe_reference_is_the_routed_sum_of_silu_gated_experts() -> None:
    h, inter = 16, 8
    w13 = {e: torch.randn(2 * inter, h, generator=GEN) for e in (0, 1)}
    w2 = {e: torch.randn(h, inter, generator=GEN) for e in (0, 1)}
    sample = MoeSample("m", "unquantized-fp32", [0, 1], [5, 9], 12, 2, w13, w2,
                       torch.arange(h), Activation("none"), torch.float32, h)
    x = torch.randn(3, h, generator=GEN)
    weights = torch.tensor([[0.7, 0.0], [0.6, 0.0], [0.5, 0.5]])
    ids = torch.tensor([[5, 3], [9, 5], [5, 9]])
    got = reference.moe_exact(sample, x, weights, ids)

    def expert(e: int, row: torch.Tensor) -> torch.Tensor:
        g = row @ w13[e].t()
        return (torch.nn.functional.silu(g[:inter]) * g[inter:]) @ w2[e].t()

    want = torch.stack([0.7 * expert(0, x[0]), 0.6 * expert(1, x[1]),
                        0.5 * expert(0, x[2]) + 0.5 * expert(1, x[2])])
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_truncating_conversion_drops_the_low_bits_and_nearest_rounds() -> None:
    v = torch.tensor([1.0 + 2**-8 + 2**-12, -(1.0 + 2**-8 + 2**-12), 3.0])
    assert reference.convert(v, torch.bfloat16, "truncate").tolist() == [1.0, -1.0, 3.0]
    assert reference.convert(v, torch.bfloat16, "nearest").tolist() == [1.0 + 2**-7,
                                                                         -(1.0 + 2**-7), 3.0]
    assert torch.equal(reference.convert(v, torch.float32, "truncate"), v)


def test_moe_ideal_rounds_only_where_the_kernel_family_stores_values() -> None:
    h, inter = 32, 16
    # A bf16 checkpoint's experts: values bf16 holds exactly.
    w13 = {0: torch.randn(2 * inter, h, generator=GEN).bfloat16().float()}
    w2 = {0: torch.randn(h, inter, generator=GEN).bfloat16().float()}
    sample = MoeSample("m", "unquantized-bf16", [0], [0], 4, 2, w13, w2, torch.arange(h),
                       Activation("none"), torch.bfloat16, h)
    x = torch.randn(3, h, generator=GEN).bfloat16()
    weights = torch.tensor([[0.75, 0.0]] * 3)
    ids = torch.tensor([[0, 1]] * 3)

    def trunc(v: torch.Tensor) -> torch.Tensor:
        return reference.convert(v, torch.bfloat16, "truncate")

    g = x.float() @ w13[0].t()
    want = trunc(0.75 * (trunc(torch.nn.functional.silu(g[:, :inter]) * g[:, inter:])
                         @ w2[0].t()))
    got = reference.moe_ideal(sample, x, weights, ids, reference.cpu_grouped("truncate"))
    assert torch.equal(got, want)
    staged = reference.moe_ideal(sample, x, weights, ids)
    assert not torch.equal(staged, want)
