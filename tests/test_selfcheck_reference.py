"""Reference GEMMs per scheme, tested on their own against hand-built checkpoints."""

from __future__ import annotations

import torch

from gemmguard import numerics
from gemmguard.selfcheck import reference
from gemmguard.selfcheck.sample import Activation, LayerSample, sample_rows

GEN = torch.Generator().manual_seed(0)


def _sample(scheme: str, weight: torch.Tensor, scale: torch.Tensor | None,
            block: tuple[int, int] | None, activation: Activation) -> LayerSample:
    rows = sample_rows(weight.shape[0])
    if scale is not None and block is not None:
        scale = scale[rows // block[0]]
    elif scale is not None:
        scale = scale[rows]
    return LayerSample("l", scheme, rows, weight[rows], scale, block, activation, torch.bfloat16)


def test_fp8_block_rows_dequantize_to_the_checkpoint_values() -> None:
    weight = torch.randn(256, 384, generator=GEN)
    q, scale = numerics.quantize_fp8_block(weight)
    sample = _sample("fp8-block", q, scale, (128, 128), Activation("group", 128))
    expected = numerics.dequantize_fp8_block(q, scale)[sample.rows]
    assert torch.equal(reference.dequantized_rows(sample), expected)


def test_fp8_per_tensor_merged_layer_keeps_one_scale_per_shard() -> None:
    # q/k/v shards with their own per-tensor scales, as a merged QKV checkpoint has them.
    q = (torch.randn(384, 128, generator=GEN) * 50).to(torch.float8_e4m3fn)
    shard_scales = torch.tensor([0.5, 2.0, 8.0])
    per_row = shard_scales.repeat_interleave(128).reshape(-1, 1)
    sample = _sample("fp8-tensor", q, per_row, None, Activation("tensor"))
    rows = reference.dequantized_rows(sample)
    assert torch.equal(rows, q.float()[sample.rows] * per_row[sample.rows])
    assert sorted(set(sample.scale.flatten().tolist())) == [0.5, 2.0, 8.0]  # type: ignore[union-attr]


def test_fp8_per_channel_and_int8_rows() -> None:
    q = (torch.randn(256, 128, generator=GEN) * 50).to(torch.float8_e4m3fn)
    scale = torch.rand(256, 1, generator=GEN) + 0.1
    fp8 = _sample("fp8-channel", q, scale, None, Activation("token"))
    assert torch.allclose(reference.dequantized_rows(fp8), q.float()[fp8.rows] * scale[fp8.rows])
    qi = torch.randint(-127, 128, (256, 128), generator=GEN, dtype=torch.int8)
    int8 = _sample("int8-channel", qi, scale, None, Activation("token"))
    assert torch.allclose(reference.dequantized_rows(int8),
                          qi.float()[int8.rows] * scale[int8.rows])


def test_unquantized_ideal_is_the_exact_product_in_the_output_dtype() -> None:
    weight = torch.randn(256, 128, generator=GEN).bfloat16()
    sample = _sample("unquantized-bf16", weight, None, None, Activation("none"))
    x = torch.randn(4, 128, generator=GEN).bfloat16()
    exact = reference.exact(sample, x)
    assert torch.equal(reference.ideal(sample, x), exact.bfloat16().float())


def test_fp8_ideal_quantizes_activations_as_the_scheme_says() -> None:
    weight = torch.randn(256, 256, generator=GEN)
    q, scale = numerics.quantize_fp8_block(weight)
    sample = _sample("fp8-block", q, scale, (128, 128), Activation("group", 128))
    x = torch.randn(16, 256, generator=GEN)
    ideal = reference.ideal(sample, x)
    by_hand = numerics.fake_quantize_fp8_groups(x, 128) @ reference.dequantized_rows(sample).t()
    assert torch.equal(ideal, by_hand.bfloat16().float())
    error = (ideal - reference.exact(sample, x)).norm() / reference.exact(sample, x).norm()
    assert 0.005 < error < 0.1  # fp8 activations cost a few percent, not nothing, not all


def test_int8_ideal_rounds_activations_per_token() -> None:
    sample = _sample("int8-channel", torch.ones(128, 128, dtype=torch.int8),
                     torch.ones(128, 1), None, Activation("token"))
    x = torch.tensor([[1.0, 0.3] + [0.0] * 126])
    quantized = reference.quantized_activations(sample, x)
    assert torch.allclose(quantized[0, :2], torch.tensor([1.0, round(0.3 * 127) / 127]))


def test_sample_rows_take_one_row_per_block_and_stay_under_one_percent() -> None:
    rows = sample_rows(1000)
    assert len(rows) == 8 and (rows // 128).tolist() == list(range(8))
    assert rows.max() < 1000
    assert len(sample_rows(4096)) / 4096 < 0.01
