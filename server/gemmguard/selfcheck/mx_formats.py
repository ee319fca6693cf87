"""Microscaled float weights: MXFP4 and MXFP8 (OCP MX) and NVFP4.

- MXFP4: e2m1 values, two per byte (low nibble first), one E8M0 (uint8 exponent) scale per
  32 input columns.
- MXFP8: e4m3 values, one E8M0 scale per 32 input columns.
- NVFP4: e2m1 values, one e4m3 scale per 16 input columns, and one fp32 global scale per
  logical shard (q/k/v, gate/up). compressed-tensors stores the global scale as a divisor
  (`weight_global_scale`, `input_global_scale`), ModelOpt as a factor (`weight_scale_2`,
  `input_scale`).

Which kernels quantize activations, and with which scale rule, is read off the kernel (or the
MoE backend): Marlin runs these weights against bf16 activations; NVIDIA's kernels round MX
scales up (rule "ceil"); AMD's and the OCP reference round them to even.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gemmguard import numerics
from gemmguard.selfcheck.schemes import (
    NO_ACTIVATION_QUANT,
    Activation,
    RowsPerExpert,
    Unchecked,
    _per_shard_rows,
    mismatch,
    required_tensor,
    rows_of_extremes,
)
from gemmguard.vllm_adapter import layer

FORMATS = {  # values dtype, scale dtype, block, values per stored element
    "mxfp4": (torch.uint8, torch.uint8, numerics.MX_BLOCK, 2),
    "mxfp8": (torch.float8_e4m3fn, torch.uint8, numerics.MX_BLOCK, 1),
    "nvfp4": (torch.uint8, torch.float8_e4m3fn, numerics.NVFP4_BLOCK, 2),
}
_E8M0 = tuple(d for d in (torch.uint8, getattr(torch, "float8_e8m0fnu", None)) if d is not None)


@dataclass(frozen=True)
class Microscaled:
    """One 2-D microscaled weight as loaded: values, block scales, per-row global factors."""

    fmt: str
    values: torch.Tensor
    scale: torch.Tensor
    row_factor: torch.Tensor | None = None  # NVFP4: fp32 (N,) = 1 / global scale of the row

    def __post_init__(self) -> None:
        values_dtype, scale_dtype, block, per_element = FORMATS[self.fmt]
        if self.values.ndim != 2 or self.values.dtype != values_dtype:
            raise mismatch(f"{self.fmt} values must be 2-D {values_dtype}, got "
                            f"{self.values.dtype} {tuple(self.values.shape)}")
        scale_ok = self.scale.dtype in _E8M0 if scale_dtype == torch.uint8 \
            else self.scale.dtype == scale_dtype
        if self.scale.ndim != 2 or not scale_ok:
            raise mismatch(f"{self.fmt} block scales must be 2-D {scale_dtype}, got "
                            f"{self.scale.dtype} {tuple(self.scale.shape)}")
        cols = self.values.shape[1] * per_element
        if self.scale.shape != (self.values.shape[0], cols // block) or cols % block:
            raise mismatch(f"{self.fmt} block scales {tuple(self.scale.shape)} do not cover "
                            f"values {tuple(self.values.shape)} in blocks of {block}")
        if self.row_factor is not None and self.row_factor.shape != (self.values.shape[0],):
            raise mismatch(f"{self.row_factor.numel()} global scales for "
                            f"{self.values.shape[0]} rows")

    @property
    def n_rows(self) -> int:
        return int(self.values.shape[0])

    def block_scales(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 (rows, K/block) effective scales: block scale × the row's global factor."""
        scale = self.scale.detach().cpu()
        scale = scale if rows is None else scale[rows]
        decoded = numerics.decode_e8m0(scale) if self.fmt.startswith("mx") else scale.float()
        if self.row_factor is not None:
            factor = self.row_factor.detach().float().cpu()
            decoded = decoded * (factor if rows is None else factor[rows])[:, None]
        return decoded

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.cpu().long()
        values = self.values.detach().cpu()[rows]
        elements = numerics.decode_e2m1(values) if self.fmt in ("mxfp4", "nvfp4") \
            else values.float()
        block = FORMATS[self.fmt][2]
        return elements * self.block_scales(rows).repeat_interleave(block, dim=1)

    def extreme_rows(self) -> list[int]:
        scale = self.block_scales().abs()
        return sorted(set(rows_of_extremes(scale.amax(dim=1))
                          + rows_of_extremes(scale.amin(dim=1))))


_tensor = layer.tensor


# --- linear layers -------------------------------------------------------------------------


def _nvfp4_row_factor(module: Any, n_rows: int) -> torch.Tensor:
    divisor = _tensor(module, "weight_global_scale")  # compressed-tensors: 1 / factor
    if divisor is not None:
        return 1.0 / _per_shard_rows(module, divisor.detach().float(), n_rows)
    factor = required_tensor(module, "weight_global_scale", "weight_scale_2")  # ModelOpt
    return _per_shard_rows(module, factor.detach().float(), n_rows)


def linear_tensors(fmt: str, module: Any) -> Microscaled:
    values = required_tensor(module, "weight_packed", "weight")
    scale = required_tensor(module, "weight_scale")
    factor = _nvfp4_row_factor(module, int(values.shape[0])) if fmt == "nvfp4" else None
    return Microscaled(fmt, values, scale, factor)


def nvfp4_input_divisor(module: Any, prefix: str = "", index: Any = None) -> float:
    """The activation global scale G the kernels quantize with (block scale = e4m3(G·amax/6)).

    vLLM takes the largest over the shards of a fused layer (and, for MoE, over what the
    backend shares): compressed-tensors stores G, ModelOpt 1/G.
    """
    divisor = _tensor(module, f"{prefix}input_global_scale")
    if divisor is not None:
        value = divisor.detach().float() if index is None else divisor.detach().float()[index]
        return float(value.max())
    factor = required_tensor(module, f"{prefix}input_global_scale", f"{prefix}input_scale")
    value = factor.detach().float() if index is None else factor.detach().float()[index]
    return float(1.0 / value.max().to(torch.float32))


def _has_input_scale(module: Any, prefix: str = "") -> bool:
    return _tensor(module, f"{prefix}input_global_scale", f"{prefix}input_scale") is not None


def _mx_rule(kernel_name: str) -> str:
    # AMD's kernels (and the OCP reference Quark emulates) round the scale to even; NVIDIA's
    # hardware conversion and FlashInfer/TRT-LLM, DeepGEMM and triton_kernels round it up.
    return "even" if any(s in kernel_name.lower() for s in ("aiter", "rocm", "emulation")) \
        else "ceil"


class MicroscaledLinearFormat:
    """mxfp4, mxfp8 and nvfp4 linear layers."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt

    def n_rows(self, module: Any) -> int:
        return int(required_tensor(module, "weight_packed", "weight").shape[0])

    def rows(self, module: Any, rows: torch.Tensor) -> torch.Tensor:
        return linear_tensors(self.fmt, module).rows(rows)

    def extreme_rows(self, module: Any) -> list[int]:
        return linear_tensors(self.fmt, module).extreme_rows()

    def activation(self, module: Any, kernel: Any) -> Activation:
        # vLLM ≤ 0.26's schemes keep a backend string ("marlin", "cutlass", …), not a kernel.
        name = type(kernel).__name__ if kernel is not None else \
            layer.holder_backend(module).title()
        if "Marlin" in name or "W4A16" in name:  # weight-only kernels: bf16 activations
            return NO_ACTIVATION_QUANT
        if self.fmt == "nvfp4":
            if not _has_input_scale(module):  # W4A16 NVFP4 checkpoints
                return NO_ACTIVATION_QUANT
            return Activation("group", numerics.NVFP4_BLOCK, nvfp4_input_divisor(module), "nvfp4")
        if self.fmt == "mxfp8":
            if "Emulation" in name:  # dequantizes weights to bf16 at load, bf16 activations
                return NO_ACTIVATION_QUANT
            return Activation("group", numerics.MX_BLOCK, fmt=f"mxfp8-{_mx_rule(name)}")
        key = layer.quant_key(layer.activation_quant_key(kernel))
        if key is None:
            return NO_ACTIVATION_QUANT
        if key.dtype == torch.uint8:  # MXFP4 activations
            return Activation("group", numerics.MX_BLOCK, fmt=f"mxfp4-{_mx_rule(name)}")
        if key.dtype == torch.float8_e4m3fn:
            row, col = key.group or (0, 0)
            if key.scale_dtype in _E8M0:
                return Activation("group", col, fmt=f"mxfp8-{_mx_rule(name)}")
            if row == 1 and col in (-1, 0):
                return Activation("token")
        raise Unchecked(f"no reference for scheme mxfp4 with activations {key}")


# --- MoE -----------------------------------------------------------------------------------


def _backend_name(module: Any) -> str:
    return layer.moe_backend_name(
        module, ("nvfp4_backend", "mxfp4_backend", "mxfp8_backend", "fp8_backend"))


class MicroscaledMoeFormat(RowsPerExpert):
    """mxfp4, mxfp8 and nvfp4 experts (compressed-tensors, ModelOpt, gpt-oss style)."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt

    def tensors(self, module: Any, which: str, expert: int) -> Microscaled:
        if _tensor(module, f"{which}_bias") is not None:
            raise Unchecked("no reference for experts with biases (gpt-oss style)")
        values = required_tensor(module, f"{which}_weight_packed", f"{which}_weight")
        scale = required_tensor(module, f"{which}_weight_scale")
        if values.ndim != 3 or scale.ndim != 3:
            raise mismatch(f"{which} experts must be 3-D, got values {tuple(values.shape)} "
                            f"and scales {tuple(scale.shape)}")
        factor = None
        if self.fmt == "nvfp4":
            factor = self._row_factor(module, which, expert, int(values.shape[1]))
        return Microscaled(self.fmt, values[expert], scale[expert], factor)

    @staticmethod
    def _row_factor(module: Any, which: str, expert: int, n_rows: int) -> torch.Tensor:
        divisor = _tensor(module, f"{which}_weight_global_scale")
        if divisor is not None:
            per_shard = 1.0 / divisor.detach().float()[expert].reshape(-1).cpu()
        else:
            per_shard = required_tensor(module, f"{which}_weight_scale_2").detach().float()[expert]
            per_shard = per_shard.reshape(-1).cpu()
        # w13: gate rows then up rows, one global scale each (or one for both).
        shard = (torch.arange(n_rows) * per_shard.numel()) // n_rows
        return per_shard[shard]

    def w2_global_factor(self, module: Any, expert: int) -> float | None:
        """NVFP4: the fp32 global factor folded into one expert's down-projection values
        (Marlin MoE applies it with the router weight, in bf16); None for MX formats."""
        if self.fmt != "nvfp4":
            return None
        return float(self._row_factor(module, "w2", expert, 1)[0])

    def expert_magnitude(self, module: Any) -> torch.Tensor:
        values = required_tensor(module, "w13_weight_packed", "w13_weight")
        magnitudes = []
        for expert in range(int(values.shape[0])):
            magnitudes.append(float(self.tensors(module, "w13", expert).block_scales()
                                    .abs().amax()))
        return torch.tensor(magnitudes)

    def _weight_only(self, module: Any) -> bool:
        backend = _backend_name(module)
        # vLLM ≤ 0.26 flags Marlin on the method (`use_marlin`) instead of naming a backend.
        return "MARLIN" in backend or backend.endswith("_BF16") or any(
            bool(layer.method_setting(module, flag)) for flag in ("use_a16", "use_marlin"))

    def activation(self, module: Any) -> Activation:
        """The activation quantization every expert shares (see `expert_activation`)."""
        if self._weight_only(module):
            return NO_ACTIVATION_QUANT
        backend = _backend_name(module)
        if self.fmt == "nvfp4":
            if not _has_input_scale(module, "w13_"):
                return NO_ACTIVATION_QUANT
            return Activation("group", numerics.NVFP4_BLOCK,
                              nvfp4_input_divisor(module, "w13_"), "nvfp4")
        if self.fmt == "mxfp8" or backend.endswith("_MXFP8"):
            return Activation("group", numerics.MX_BLOCK, fmt=f"mxfp8-{_mx_rule(backend)}")
        if backend.endswith("MXFP4_MXFP4"):
            return Activation("group", numerics.MX_BLOCK, fmt=f"mxfp4-{_mx_rule(backend)}")
        raise Unchecked(f"no reference for the activations of MXFP4 MoE backend {backend}")

    def expert_activation(self, module: Any, expert: int, which: str = "w13") -> Activation:
        """One expert's activation quantization: NVFP4 keeps a global input scale per expert.

        vLLM shares one over all experts for FlashInfer TRT-LLM, and takes each expert's own
        (the larger of gate's and up's for w13) for the other backends.
        """
        shared = self.activation(module)
        if shared.fmt != "nvfp4" or "TRTLLM" in _backend_name(module):
            return shared
        divisor = nvfp4_input_divisor(module, f"{which}_", expert)
        return Activation("group", numerics.NVFP4_BLOCK, divisor, "nvfp4")


def moe_scheme_of(module: Any) -> str | None:
    """mxfp4, mxfp8 or nvfp4 for microscaled experts; None otherwise."""
    by_backend = layer.microscaled_moe_scheme(module)
    if by_backend is not None:
        return by_backend
    scale = _tensor(module, "w13_weight_scale")
    values = _tensor(module, "w13_weight_packed", "w13_weight")
    if scale is None or values is None:
        return None
    if scale.dtype in _E8M0:
        return "mxfp8" if values.dtype == torch.float8_e4m3fn else "mxfp4"
    if scale.dtype == torch.float8_e4m3fn and values.dtype == torch.uint8:
        return "nvfp4"
    return None
