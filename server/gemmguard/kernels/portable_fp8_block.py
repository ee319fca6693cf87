"""Portable FP8 block-scaled linear kernels: plain torch, so FP8 checkpoints load anywhere.

vLLM's CPU build has FP8 block-scaled kernels only for CPUs with AMX, and every GPU list
ends with hardware-specific kernels; on any other machine an FP8 block checkpoint fails to
load ("Failed to find a kernel … requires AMX"). These two are appended as the last
candidates on every platform, so vLLM's own kernels keep priority wherever they work.

- `PortableFp8BlockDequantKernel` (W8A16): dequantizes the weights once at load to the
  activation dtype and runs the platform's GEMM. Fast; more accurate than the scheme.
- `PortableFp8BlockEmulatedKernel` (W8A8): keeps FP8 weights and quantizes activations per
  1×128 group exactly as the scheme prescribes, in fp32. Slow; numerically the scheme itself.
"""

from __future__ import annotations

from typing import Any

import torch

from gemmguard import numerics, vllm_adapter
from gemmguard.vllm_adapter import layer as layer_view

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


_block_shape = layer_view.config_block_shape


def _replace_parameter(layer: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    # A plain Parameter: vLLM's weight-loader metadata is not needed after load.
    delattr(layer, name)
    layer.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))


def build_kernels() -> tuple[type, type]:
    """Create the kernel classes on vLLM's FP8 block kernel base of the installed version."""
    base: Any = vllm_adapter.fp8_block_kernel_base()

    class PortableFp8BlockKernel(base):  # type: ignore[misc]  # a base found at run time (Any)
        """What both portable kernels share: they run anywhere torch runs."""

        apply_input_quant = False  # each quantizes (or not) in apply_block_scaled_mm

        @classmethod
        def is_supported(cls, compute_capability: int | None = None) -> tuple[bool, str | None]:
            return True, None

        @classmethod
        def can_implement(cls, config: Any) -> tuple[bool, str | None]:
            ok, reason = super().can_implement(config)
            if not ok:
                return ok, reason
            rows, cols = _block_shape(config)
            if rows <= 0 or cols <= 0:
                return False, f"needs a 2-D weight block shape, got ({rows}, {cols})"
            if config.out_dtype not in _OUT_DTYPES:
                return False, f"output dtype {config.out_dtype} is not bf16, fp16 or fp32"
            return True, None

    class PortableFp8BlockDequantKernel(PortableFp8BlockKernel):
        """W8A16: weights dequantized to the activation dtype at load, one GEMM per call."""

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            params = layer_view.block_scaled_params(self, layer)
            weight = numerics.dequantize_fp8_block(
                params.weight.data, params.scale.data, _block_shape(self.config)
            )
            _replace_parameter(layer, params.weight_name, weight.to(self.config.out_dtype))

        def apply_block_scaled_mm(self, A: torch.Tensor, B: torch.Tensor,
                                  As: torch.Tensor, Bs: torch.Tensor) -> torch.Tensor:
            # A: unquantized activations (apply_input_quant is False); B: the dequantized weight.
            return torch.nn.functional.linear(A, B)

    class PortableFp8BlockEmulatedKernel(PortableFp8BlockKernel):
        """W8A8: 1×128 fp8 activation groups and 128×128 fp8 weight blocks, computed in fp32."""

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            params = layer_view.block_scaled_params(self, layer)
            _replace_parameter(layer, params.scale_name, params.scale.data.float())

        def apply_block_scaled_mm(self, A: torch.Tensor, B: torch.Tensor,
                                  As: torch.Tensor, Bs: torch.Tensor) -> torch.Tensor:
            # A: unquantized activations, quantized here as the scheme says; B: fp8 weight.
            block = _block_shape(self.config)
            weight = numerics.dequantize_fp8_block(B, Bs, block)
            return numerics.fake_quantize_fp8_groups(A, block[1]) @ weight.t()

    return PortableFp8BlockDequantKernel, PortableFp8BlockEmulatedKernel


PORTABLE_KERNEL_NAMES = ("PortableFp8BlockDequantKernel", "PortableFp8BlockEmulatedKernel")
