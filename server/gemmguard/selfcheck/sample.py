"""Keep a small sample of each layer's checkpoint representation, before vLLM post-processes it.

Kernels re-lay-out or re-quantize weights in `process_weights_after_loading` (DeepGEMM's
power-of-two scales, Marlin repacking, AITER shuffles). A reference built from the weights
in memory afterwards would share the kernel's mistakes, so the sample is taken just before.
One output row per 128-row block is kept: a kernel that corrupts one block is still seen,
and the sample stays under 1% of the weights.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from gemmguard import ledger, vllm_adapter
from gemmguard.inventory.report import _kernel_of, scheme_of

ROW_BLOCK = 128


@dataclass
class Activation:
    """How the scheme quantizes activations: group (1×size), token, tensor, static, or none."""

    kind: str
    size: int = 0
    static_scale: float = 0.0


@dataclass
class LayerSample:
    """Sampled rows of one layer's checkpoint weights, with what is needed to dequantize them."""

    layer: str
    scheme: str
    rows: torch.Tensor  # indices of the sampled output rows
    weight: torch.Tensor  # (rows, K) in the checkpoint dtype
    scale: torch.Tensor | None  # per sampled row: (rows, K-blocks) block, (rows, 1) otherwise
    block: tuple[int, int] | None
    activation: Activation
    out_dtype: torch.dtype

    def nbytes(self) -> int:
        total = self.weight.numel() * self.weight.element_size() + self.rows.numel() * 8
        if self.scale is not None:
            total += self.scale.numel() * self.scale.element_size()
        return total


_SAMPLES: dict[str, LayerSample] = {}
_MODEL_BYTES = [0]


def samples() -> dict[str, LayerSample]:
    """The samples this process captured, by layer name."""
    return _SAMPLES


def model_weight_bytes() -> int:
    """Bytes of the model's parameters as loaded from the checkpoint (before post-processing)."""
    return _MODEL_BYTES[0]


def sample_rows(n_rows: int) -> torch.Tensor:
    """One row per 128-row block, at a position that varies from block to block."""
    rows = []
    for block_start in range(0, n_rows, ROW_BLOCK):
        size = min(ROW_BLOCK, n_rows - block_start)
        rows.append(block_start + (block_start // ROW_BLOCK * 37 + 5) % size)
    return torch.tensor(rows, dtype=torch.long)


def _activation(kernel: Any, module: Any) -> Activation:
    key = getattr(getattr(kernel, "config", None), "activation_quant_key", None)
    if key is None:
        return Activation("none")
    scale = key.scale
    if scale.static:
        input_scale = getattr(module, "input_scale", None)
        value = float(input_scale.max()) if input_scale is not None else 1.0
        return Activation("static", static_scale=value)
    row, col = int(scale.group_shape.row), int(scale.group_shape.col)
    if col > 1:
        return Activation("group", size=col)
    return Activation("token" if row == 1 else "tensor")


def _row_scales(module: Any, scheme: str, rows: torch.Tensor, block: tuple[int, int] | None,
                n_rows: int) -> torch.Tensor | None:
    scale = getattr(module, "weight_scale_inv", None)
    if scale is None:
        scale = getattr(module, "weight_scale", None)
    if scale is None:
        return None
    scale = scale.detach().float().cpu()
    if block is not None:
        return scale[rows // block[0]].clone()
    if scale.numel() == n_rows:
        return scale.reshape(n_rows, 1)[rows].clone()
    # Per-tensor: one scale per logical shard of a merged layer (q/k/v, gate/up).
    widths = list(getattr(module, "logical_widths", None) or [n_rows])
    flat = scale.reshape(-1)
    shard_of_row = torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(widths))
    per_row = flat[shard_of_row.clamp(max=flat.numel() - 1)]
    return per_row[rows].reshape(-1, 1).clone()


def capture(name: str, module: Any) -> LayerSample | None:
    """Sample `module`'s checkpoint weights if it is a linear layer gemmguard can check."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.is_meta:
        return None
    method = module.quant_method
    kernel = _kernel_of(getattr(module, "scheme", None)) or _kernel_of(method)
    scheme = scheme_of(kernel, weight)
    block = None
    if scheme.endswith("-block"):
        group = kernel.config.weight_quant_key.scale.group_shape
        block = (int(group.row), int(group.col))
    elif not (scheme.startswith(("fp8-", "int8-", "unquantized-"))):
        return None  # schemes without a reference yet (e.g. w4a16) are not sampled
    n_rows = weight.shape[0]
    rows = sample_rows(n_rows)
    out_dtype = getattr(module, "orig_dtype", None) or (
        weight.dtype if weight.dtype.is_floating_point and weight.element_size() > 1
        else torch.bfloat16)
    return LayerSample(
        layer=name,
        scheme=scheme,
        rows=rows,
        # Kept on the host: references are computed there, and device memory stays untouched.
        weight=weight.detach()[rows.to(weight.device)].cpu(),
        scale=None if scheme.startswith("unquantized") else _row_scales(
            module, scheme, rows, block, n_rows),
        block=block,
        activation=_activation(kernel, module),
        out_dtype=out_dtype,
    )


def capture_all(model: torch.nn.Module) -> None:
    """Sample every checkable layer of `model` (called just before post-processing)."""
    linear = vllm_adapter.linear_base()
    lm_head = vllm_adapter.lm_head_class()
    _MODEL_BYTES[0] = sum(p.numel() * p.element_size() for p in model.parameters())
    for name, module in model.named_modules():
        if getattr(module, "quant_method", None) is None:
            continue
        if isinstance(module, (linear, lm_head)):
            sample = capture(name, module)
            if sample is not None:
                _SAMPLES[name] = sample


CAPTURE_PATCH = ledger.Patch(
    name="selfcheck-weight-sample",
    why="The self-check's reference must come from the checkpoint's own representation; "
    "kernels re-quantize or repack weights in process_weights_after_loading.",
    how="Rebind process_weights_after_loading in vllm.model_executor.model_loader.base_loader "
    "(looked up there by name at call time) with a wrapper that samples rows first.",
    upstream="none: vLLM keeps no copy of the checkpoint weights after post-processing.",
    remove_when="vLLM exposes a pre-post-processing hook for loaders.",
)
_INSTALLED = False


def install() -> None:
    """Wrap the loader's post-processing step once per process."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    module = vllm_adapter.loader_module()
    original = module.process_weights_after_loading

    @functools.wraps(original)
    def process_weights_after_loading(model: Any, *args: Any, **kwargs: Any) -> Any:
        capture_all(model)
        return original(model, *args, **kwargs)

    module.process_weights_after_loading = process_weights_after_loading
    ledger.record(CAPTURE_PATCH)
