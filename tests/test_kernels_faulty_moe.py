"""The MoE self-check on vLLM's own CPU experts kernel: honest passes, each faulty one is caught.

The layer around the kernel is minimal (no engine), but the experts object, its weight
post-processing and its `apply` are vLLM's CPUUnquantizedExperts (and the faulty subclasses
gemmguard injects in tests), running vLLM's `cpu_fused_moe` op.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from gemmguard.kernels import faulty_moe
from gemmguard.selfcheck import measure, sample
from gemmguard.selfcheck.measure import LayerResult
from gemmguard.vllm_adapter import moe

EXPERTS, HIDDEN, INTER, TOP_K = 8, 256, 256, 2


def _experts(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 (E, 2I, H) and (E, H, I) experts, magnitudes spread over 2^-3..2^3 as in the demo."""
    gen = torch.Generator().manual_seed(seed)
    gains = torch.tensor([2.0 ** (e % 7 - 3) for e in range(EXPERTS)]).reshape(-1, 1, 1)
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen) * HIDDEN**-0.5 * gains
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, generator=gen) * INTER**-0.5 * gains
    return w13.bfloat16(), w2.bfloat16()


def _check(experts_cls: type, seed: int) -> LayerResult:
    """Sample the checkpoint experts, let the kernel post-process them, run the MoE check."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig

    w13, w2 = _experts(seed)
    layer = torch.nn.Module()
    layer.w13_weight = torch.nn.Parameter(w13, requires_grad=False)
    layer.w2_weight = torch.nn.Parameter(w2, requires_grad=False)
    layer.top_k, layer.hidden_size, layer.global_num_experts = TOP_K, HIDDEN, EXPERTS
    taken = sample.capture_moe("model.layers.0.mlp.experts", layer, seed)
    experts = object.__new__(experts_cls)  # vLLM builds it from configs an engine makes
    experts.quant_config = FusedMoEQuantConfig.make()
    experts.moe_config = SimpleNamespace(intermediate_size_per_partition=INTER,
                                         activation=MoEActivation.SILU)
    experts.process_weights_after_loading(layer)

    def apply(layer: Any, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, shared_experts: Any = None,
              shared_experts_input: Any = None) -> torch.Tensor:
        out = torch.empty(x.shape[0], HIDDEN, dtype=x.dtype)
        experts.apply(out, x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids,
                      MoEActivation.SILU, EXPERTS, None, None, None, None, None, None, False)
        return out

    layer.quant_method = SimpleNamespace(
        is_monolithic=False, moe_kernel=SimpleNamespace(fused_experts=experts), apply=apply)
    return measure.check_moe(layer, taken, experts_cls.__name__, seed)


def _faulty(name: str) -> type:
    honest = moe.cpu_unquantized_experts_class()
    assert honest is not None
    (cls,) = faulty_moe.build_faulty_moe_kernels(honest, (name,))
    return cls


@pytest.mark.parametrize("seed", range(5))
def test_vllm_cpu_experts_pass_over_seeds(seed: int) -> None:
    honest = moe.cpu_unquantized_experts_class()
    assert honest is not None
    result = _check(honest, seed)
    assert result.verdict == "pass", result
    assert result.excess_bits is not None and result.excess_bits < measure.DEGRADED_EXCESS_BITS
    assert len(result.experts) == 4 and {e["verdict"] for e in result.experts} == {"pass"}


def test_e8m0_requantized_experts_are_degraded_not_broken() -> None:
    result = _check(_faulty("moe-e8m0"), 0)
    assert result.verdict == "degraded", result
    # fp8 weights and activations with power-of-two scales: about 3-4 bits below bf16 here.
    assert result.excess_bits is not None and result.excess_bits > 1.0
    # Experts given enough tokens to judge a fraction of a bit read degraded themselves; the
    # others (a token or two) are judged for broken only, and the layer's verdict covers them.
    judged = [e for e in result.experts if e["excess_judged"]]
    assert judged and {e["verdict"] for e in judged} == {"degraded"}
    assert all(e["excess_bits"] > 1.0 for e in result.experts)


def test_experts_requantized_to_mxfp4_at_load_fail_against_the_checkpoint() -> None:
    # vLLM 0.34's VLLM_FP8_MOE_REQUANT (ROCm) turns FP8 experts into MXFP4 at load: the check's
    # reference is the checkpoint, so the requantization is a loss it must see, on every expert.
    result = _check(_faulty("moe-mxfp4"), 0)
    assert result.verdict == "degraded", result  # ~5 bits lost: wrong enough, not garbage
    assert result.excess_bits is not None and result.excess_bits > 2.0
    assert all(e["excess_bits"] > 2.0 for e in result.experts)
    judged = [e for e in result.experts if e["excess_judged"]]
    assert judged and {e["verdict"] for e in judged} == {"degraded"}


def test_mxfp4_requantization_keeps_e2m1_values_on_power_of_two_scales() -> None:
    w = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    q = faulty_moe.mxfp4_requantize_experts(w).float()
    blocks = q.reshape(2, 4, 2, 32)
    scale = torch.exp2(torch.floor(torch.log2(blocks.abs().amax(dim=-1, keepdim=True))) - 2)
    elements = (blocks / scale).abs()
    assert set(elements.unique().tolist()) <= {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}
    assert not torch.equal(q, w.float())


def test_garbage_experts_are_broken() -> None:
    result = _check(_faulty("moe-garbage"), 0)
    assert result.verdict == "broken", result
    assert result.worst_block_error is not None and result.worst_block_error > 0.25


@pytest.mark.parametrize("seed", range(2))
def test_one_corrupted_expert_is_named_in_the_per_expert_result(seed: int) -> None:
    result = _check(_faulty("moe-corrupt-expert"), seed)
    assert result.verdict == "broken", result
    corrupted = faulty_moe.smallest_expert(_experts(seed)[0])
    verdicts = {e["expert"]: e["verdict"] for e in result.experts}
    assert verdicts.pop(corrupted) == "broken"
    assert set(verdicts.values()) == {"pass"}


def test_the_corrupted_expert_is_invisible_in_the_layer_sum_alone() -> None:
    """The smallest expert gets one token of 128 and small outputs: only its own verdict sees it."""
    result = _check(_faulty("moe-corrupt-expert"), 0)
    assert result.worst_block_error is not None and result.worst_block_error < 0.25
    assert measure.verdict(result.bits or 0.0, result.excess_bits or 0.0,
                           result.worst_block_error) == "pass"


def test_e8m0_requantization_rounds_block_scales_to_powers_of_two() -> None:
    w13, _ = _experts(0)
    requantized = faulty_moe.e8m0_requantize_experts(w13).float()
    block = requantized[3, :128, :128]
    scale = w13[3, :128, :128].float().abs().max() / 448.0
    pow2 = 2.0 ** torch.ceil(torch.log2(scale))
    # Every value is an fp8 e4m3 number times the block's power-of-two scale.
    q = block / pow2
    assert torch.equal(q, q.to(torch.float8_e4m3fn).float())
    assert not torch.equal(requantized, w13.float())
