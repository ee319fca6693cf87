"""Faulty MoE experts for proving the self-check on MoE layers: each mimics a real failure.

Registered only when GEMMGUARD_TEST_KERNELS names them, at the front of vLLM's candidates for
the unquantized (bf16) MoE on CPU, so vLLM's oracle picks them first; never in a normal start.
Each derives from vLLM's own CPU experts and runs its real kernel, with one fault added.

- `E8M0RequantCPUExperts`: re-quantizes the experts' weights to fp8 with power-of-two (E8M0)
  128×128 block scales at load, and activations to fp8 with power-of-two 1×128 group scales,
  as DeepGEMM's UE8M0 path does.
- `GarbageCPUExperts`: returns noise of the right shape and magnitude.
- `CorruptExpertCPUExperts`: right for every expert but one, whose down projection is read
  in the wrong row order (a stale layout: a race between a weight conversion and its
  consumer). The corrupted expert is the one with the smallest weights, as the experts whose
  scales are extreme were the ones upstream failures hit (flashinfer #2595).

Forward passes make no torch.Generator: torch.compile cannot trace one made inside forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gemmguard import numerics
from gemmguard.kernels.faulty import e8m0_activations
from gemmguard.vllm_adapter import layer as layer_view

FAULTY_MOE_KERNELS = {
    "moe-e8m0": "E8M0RequantCPUExperts",
    "moe-garbage": "GarbageCPUExperts",
    "moe-corrupt-expert": "CorruptExpertCPUExperts",
    "moe-mxfp4": "Mxfp4RequantCPUExperts",
}
BLOCK = 128



def e8m0_requantize_experts(weight: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """(E, N, K) expert weights after fp8 quantization with power-of-two block scales."""
    experts, n, k = weight.shape
    pad_n, pad_k = -n % block, -k % block
    padded = torch.nn.functional.pad(weight.float(), (0, pad_k, 0, pad_n))
    blocks = padded.reshape(experts, (n + pad_n) // block, block, (k + pad_k) // block, block)
    scale = numerics.pow2_ceil(blocks.abs().amax(dim=(2, 4), keepdim=True).clamp(min=1e-12)
                  / numerics.FP8_MAX)
    q = (blocks / scale).clamp(-numerics.FP8_MAX, numerics.FP8_MAX).to(numerics.FP8_DTYPE)
    requantized = (q.float() * scale).reshape(experts, n + pad_n, k + pad_k)[:, :n, :k]
    return requantized.to(weight.dtype).contiguous()


def mxfp4_requantize_experts(weight: torch.Tensor) -> torch.Tensor:
    """(E, N, K) expert weights after a round trip through MXFP4 (e2m1 elements, one E8M0 scale
    per 32 along K, the OCP rule vLLM's MXFP4 downcast uses): what vLLM 0.34's
    VLLM_FP8_MOE_REQUANT does to FP8 experts at load (ROCm), a loss against the checkpoint."""
    experts, n, k = weight.shape
    flat = weight.float().reshape(experts * n, k)
    return numerics.fake_quantize_mx(flat, "mxfp4", "even").reshape(experts, n, k).to(
        weight.dtype).contiguous()


def smallest_expert(w13: torch.Tensor) -> int:
    """The local expert whose gate/up weights have the smallest largest magnitude."""
    return int(w13.detach().float().abs().amax(dim=(1, 2)).argmin())


def _expert_weight(layer: torch.nn.Module, name: str) -> torch.Tensor:
    """An MoE layer's expert weight Parameter (`w13_weight`, `w2_weight`)."""
    weight = layer_view.tensor(layer, name)
    if weight is None:
        raise TypeError(f"{type(layer).__name__} holds no {name}: not an unquantized MoE layer")
    return weight


def _requantize_in_place(layer: torch.nn.Module,
                         requantize: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Both expert weights of `layer` replaced by `requantize` of themselves (a load-time loss)."""
    for name in ("w13_weight", "w2_weight"):
        weight = _expert_weight(layer, name).data
        weight.copy_(requantize(weight))


def build_faulty_moe_kernels(honest: type, names: tuple[str, ...]) -> list[type]:
    """Faulty experts (by short name, see FAULTY_MOE_KERNELS) on vLLM's CPU experts class."""

    class E8M0RequantCPUExperts(honest):  # type: ignore[misc]  # a base found at run time (Any)
        """Power-of-two fp8 block scales for expert weights and activations (DeepGEMM UE8M0)."""

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            _requantize_in_place(layer, e8m0_requantize_experts)
            super().process_weights_after_loading(layer)

        def apply(self, output: torch.Tensor, hidden_states: torch.Tensor,
                  *args: Any, **kwargs: Any) -> None:
            group = min(BLOCK, hidden_states.shape[-1])
            quantized = e8m0_activations(hidden_states, group).to(hidden_states.dtype)
            super().apply(output, quantized, *args, **kwargs)

    class GarbageCPUExperts(honest):  # type: ignore[misc]  # a base found at run time (Any)
        """Noise with the output's shape and scale."""

        def apply(self, output: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            super().apply(output, *args, **kwargs)
            # Deterministic noise from a formula, not a torch.Generator (compile-safe).
            index = torch.arange(output.numel(), device=output.device, dtype=torch.float32)
            noise = torch.sin(index * 12.9898).reshape(output.shape)
            output.copy_((noise * output.float().std()).to(output.dtype))

    class CorruptExpertCPUExperts(honest):  # type: ignore[misc]  # a base found at run time (Any)
        """One expert's down projection in reversed row order; every other expert right."""

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            expert = smallest_expert(_expert_weight(layer, "w13_weight"))
            w2 = _expert_weight(layer, "w2_weight").data
            w2[expert] = w2[expert].flip(0)
            super().process_weights_after_loading(layer)

    class Mxfp4RequantCPUExperts(honest):  # type: ignore[misc]  # a base found at run time (Any)
        """Expert weights re-quantized to MXFP4 at load; activations untouched."""

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            _requantize_in_place(layer, mxfp4_requantize_experts)
            super().process_weights_after_loading(layer)

    by_short = {"moe-e8m0": E8M0RequantCPUExperts, "moe-garbage": GarbageCPUExperts,
                "moe-corrupt-expert": CorruptExpertCPUExperts,
                "moe-mxfp4": Mxfp4RequantCPUExperts}
    return [by_short[name] for name in names if name in by_short]
