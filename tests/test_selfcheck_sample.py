"""Sampling an MoE layer's checkpoint experts, packed ones included, before vLLM post-processes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from compressed_tensors.compressors import NVFP4PackedCompressor, PackedQuantizationCompressor

from gemmguard.selfcheck import reference, sample, schemes
from gemmguard.selfcheck.schemes import Activation, Unchecked
from test_selfcheck_schemes import INTER, Layer, _ct, _experts, _mp_config, _stack, _weight

H = 256


def test_packed_4_bit_experts_are_sampled_without_a_3d_w13_weight() -> None:
    w13, _ = _experts("W4A16", PackedQuantizationCompressor, 2 * INTER, H, 10)
    w2, _ = _experts("W4A16", PackedQuantizationCompressor, H, INTER, 20)
    method = SimpleNamespace(num_bits=4, group_size=128, wna16_backend="CPU")
    layer = Layer(quant_method=method, hidden_size=H, intermediate_size_per_partition=INTER,
                  top_k=2, **_stack(w13, "w13"), **_stack(w2, "w2"))
    assert not hasattr(layer, "w13_weight") and not hasattr(layer, "w2_weight")
    taken = sample.capture_moe("mlp.experts", layer)
    fmt = schemes.moe_format("w4a16-g128", layer)
    assert taken.scheme == "w4a16-g128" and taken.hidden == H
    assert taken.experts[1] == 2  # the largest-scale expert (planted ×10) is always sampled
    assert len(taken.experts) == 4 and taken.num_experts == 4
    assert torch.equal(taken.rows, sample.spread_rows(H, sample.MOE_ROWS))
    assert set(sample.sample_rows(H).tolist()) <= set(taken.rows.tolist())
    for expert in taken.experts:
        assert torch.equal(taken.w13[expert], fmt.w13(layer, expert))
        assert torch.equal(taken.w2[expert], fmt.w2_rows(layer, expert, taken.rows))
    assert taken.out_dtype == torch.bfloat16 and taken.expert_activations == {}


def test_nvfp4_experts_keep_each_experts_input_scales_in_the_sample_and_the_ideal() -> None:
    gate, _ = _experts("NVFP4", NVFP4PackedCompressor, INTER, H, 40)
    up, _ = _experts("NVFP4", NVFP4PackedCompressor, INTER, H, 50)
    down, _ = _experts("NVFP4", NVFP4PackedCompressor, H, INTER, 60)
    w13 = [{k: torch.cat([g[k], u[k]]) for k in g} for g, u in zip(gate, up, strict=True)]
    stacked = _stack(w13, "w13")
    stacked["w13_weight_global_scale"] = stacked["w13_weight_global_scale"].reshape(4, 2)
    method = SimpleNamespace(nvfp4_backend=SimpleNamespace(value="FLASHINFER_CUTLASS"))
    layer = Layer(quant_method=method, hidden_size=H, top_k=1,
                  w13_input_global_scale=torch.tensor([[100.0, 100.0], [80.0, 90.0],
                                                       [70.0, 70.0], [60.0, 65.0]]),
                  w2_input_global_scale=torch.tensor([40.0, 30.0, 20.0, 10.0]),
                  **stacked, **_stack(down, "w2"))
    taken = sample.capture_moe("mlp.experts", layer)
    assert taken.scheme == "nvfp4"
    assert taken.expert_activations[1] == (Activation("group", 16, 90.0, "nvfp4"),
                                           Activation("group", 16, 30.0, "nvfp4"))
    # The global factor folded into each expert's down values (Marlin MoE applies it in bf16
    # with the router weight): the inverse of compressed-tensors' divisor.
    divisors = layer.w2_weight_global_scale.float().reshape(-1)
    assert taken.w2_global_factor == {e: pytest.approx(1 / float(divisors[e]))
                                      for e in taken.experts}
    # The ideal quantizes each expert's inputs by that expert's own global scale.
    x = torch.randn(2, H, generator=torch.Generator().manual_seed(0)).bfloat16()
    ids = torch.tensor([[1], [1]])
    weights = torch.ones(2, 1)
    own = reference.moe_ideal(taken, x, weights, ids)
    taken.expert_activations = {}
    shared = reference.moe_ideal(taken, x, weights, ids)
    assert not torch.equal(own, shared)


def test_experts_without_a_hidden_size_or_a_3d_down_weight_are_unchecked() -> None:
    w13, _ = _experts("W4A16", PackedQuantizationCompressor, 2 * INTER, H, 10)
    layer = Layer(quant_method=SimpleNamespace(num_bits=4, group_size=128),
                  **_stack(w13, "w13"))
    with pytest.raises(Unchecked, match="no hidden_size"):
        sample.capture_moe("mlp.experts", layer)


def test_moe_rows_cover_every_block_and_at_least_64_rows() -> None:
    assert torch.equal(sample.spread_rows(40, 64), torch.arange(40))
    rows = sample.spread_rows(4096, 64)
    assert len(rows) >= 64 and len(set(rows.tolist())) == len(rows)
    assert set((rows // 128).tolist()) == set(range(32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_packed_4_bit_layer_is_checked_in_the_models_dtype(dtype: torch.dtype) -> None:
    # Found on an H100: Exllama takes fp16 only; fed bf16 activations (the old default for a
    # packed weight, which has no float dtype) it read them as fp16 and every layer read broken
    # (excess ~40 bit). vLLM's LinearBase keeps the model's dtype as `params_dtype`.
    from compressed_tensors.compressors import PackedQuantizationCompressor

    tensors, _ = _ct(_weight(), "W4A16", PackedQuantizationCompressor, dtype)
    kernel = SimpleNamespace(config=_mp_config(4, 128, False))
    layer = Layer(input_size_per_partition=tensors["weight_packed"].shape[1] * 8,
                  params_dtype=dtype, **tensors)
    taken = sample.capture_linear("proj", layer, kernel, "w4a16-g128")
    assert taken.out_dtype == dtype


def test_experts_take_vllms_moe_input_dtype() -> None:
    w13, _ = _experts("W4A16", PackedQuantizationCompressor, 2 * INTER, H, 10)
    w2, _ = _experts("W4A16", PackedQuantizationCompressor, H, INTER, 20)
    method = SimpleNamespace(num_bits=4, group_size=128, wna16_backend="CPU")
    layer = Layer(quant_method=method, hidden_size=H, intermediate_size_per_partition=INTER,
                  top_k=2, moe_config=SimpleNamespace(in_dtype=torch.float16),
                  **_stack(w13, "w13"), **_stack(w2, "w2"))
    assert sample.capture_moe("mlp.experts", layer).out_dtype == torch.float16
