"""Faulty FP8 block kernels for proving the self-check: each mimics a real failure.

Registered only when GEMMGUARD_TEST_KERNELS names them, at the front of the FP8 block
candidate lists so vLLM picks them first; never in a normal start.

- `E8M0RequantFp8BlockKernel`: re-quantizes weights to power-of-two (E8M0) block scales at
  load and activations with power-of-two group scales, as DeepGEMM's UE8M0 path does.
- `GarbageFp8BlockKernel`: returns noise of the right shape and magnitude.
- `CorruptBlockFp8BlockKernel`: correct, except one 128-row block of outputs is wrong (the
  signature of a stream race between a weight conversion and its consumer).
"""

from __future__ import annotations

from typing import Any

import torch

from gemmguard import numerics
from gemmguard.vllm_adapter import layer as layer_view

FAULTY_KERNELS = {
    "e8m0": "E8M0RequantFp8BlockKernel",
    "garbage": "GarbageFp8BlockKernel",
    "corrupt-block": "CorruptBlockFp8BlockKernel",
}



def e8m0_requantize(weight: torch.Tensor, scale: torch.Tensor,
                    block: tuple[int, int]) -> torch.Tensor:
    """fp32 weight after DeepGEMM-style re-quantization to power-of-two block scales."""
    dequantized = numerics.dequantize_fp8_block(weight, scale, block)
    pow2 = numerics.pow2_ceil(scale.float())
    expanded = numerics.expand_block_scales(pow2, block, tuple(weight.shape))
    q = (dequantized / expanded).clamp(-numerics.FP8_MAX, numerics.FP8_MAX)
    return q.to(numerics.FP8_DTYPE).float() * expanded


def e8m0_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """Activations through 1×group fp8 quantization with power-of-two scales."""
    tokens, k = x.shape
    xf = x.float().reshape(tokens, -1, group)
    scale = numerics.pow2_ceil(xf.abs().amax(dim=-1).clamp(min=1e-12) / numerics.FP8_MAX)
    q = (xf / scale[..., None]).clamp(-numerics.FP8_MAX, numerics.FP8_MAX)
    return (q.to(numerics.FP8_DTYPE).float() * scale[..., None]).reshape(tokens, k)


def build_faulty_kernels(honest: Any, names: tuple[str, ...]) -> list[type]:
    """Faulty kernels (by short name: e8m0, garbage, corrupt-block) on the portable base."""

    def block_of(kernel: Any) -> tuple[int, int]:
        return layer_view.config_block_shape(layer_view.kernel_config(kernel))

    class E8M0RequantFp8BlockKernel(honest):  # type: ignore[misc]  # a base found at run time (Any)
        """Power-of-two block scales for weights and activations (DeepGEMM UE8M0)."""

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            params = layer_view.block_scaled_params(self, layer)
            weight = e8m0_requantize(params.weight.data, params.scale.data, block_of(self))
            layer.weight = torch.nn.Parameter(weight, requires_grad=False)

        def apply_block_scaled_mm(self, A: torch.Tensor, B: torch.Tensor,
                                  As: torch.Tensor, Bs: torch.Tensor) -> torch.Tensor:
            return e8m0_activations(A, block_of(self)[1]) @ B.t()

    class GarbageFp8BlockKernel(honest):  # type: ignore[misc]  # a base found at run time (Any)
        """Noise with the output's shape and scale."""

        def apply_block_scaled_mm(self, A: torch.Tensor, B: torch.Tensor,
                                  As: torch.Tensor, Bs: torch.Tensor) -> torch.Tensor:
            out = torch.nn.functional.linear(A, B)
            # Deterministic noise from a formula, not a torch.Generator: torch.compile cannot
            # trace a generator made inside forward, and a test kernel must compile.
            index = torch.arange(out.numel(), device=out.device, dtype=torch.float32)
            noise = torch.sin(index * 12.9898).reshape(out.shape)
            return (noise * out.float().std()).to(out.dtype)

    class CorruptBlockFp8BlockKernel(honest):  # type: ignore[misc]  # a base found at run time (Any)
        """Right everywhere but one 128-row block of outputs, which holds stale values."""

        def apply_block_scaled_mm(self, A: torch.Tensor, B: torch.Tensor,
                                  As: torch.Tensor, Bs: torch.Tensor) -> torch.Tensor:
            out = torch.nn.functional.linear(A, B)
            block = min(1, out.shape[-1] // 128 - 1) * 128
            out[..., block:block + 128] = out[..., block:block + 128].flip(-1)
            return out

    by_short = {"e8m0": E8M0RequantFp8BlockKernel, "garbage": GarbageFp8BlockKernel,
                "corrupt-block": CorruptBlockFp8BlockKernel}
    return [by_short[name] for name in names if name in by_short]  # moe-* are faulty_moe's
