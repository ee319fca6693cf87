"""Walk a loaded model and name the kernel every GEMM-owning module really runs.

Read after `process_weights_after_loading`: some quant methods re-select there, and MoE
kernels are only built there. Rows are plain dicts (they cross vLLM's msgspec RPC).
"""

from __future__ import annotations

from typing import Any

import torch

from gemmguard import vllm_adapter
from gemmguard.inventory.selection import (
    Selection,
    selection_for_config,
    selection_for_layer,
    selection_for_moe_config,
)
from gemmguard.vllm_adapter import layer
from gemmguard.vllm_adapter.moe import experts_of, moe_config_of

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def kernel_name(kernel: Any) -> str:
    name = type(kernel).__name__
    # Kernels that pick a sub-kernel per call by shape (e.g. M<32 FlashInfer, else DeepGEMM).
    parts = layer.kernel_parts(kernel)
    if parts is not None:
        name += f"[{type(parts[0]).__name__}|{type(parts[1]).__name__}]"
    return name


def _group_scheme(prefix: str, group_shape: tuple[int, int] | None) -> str:
    row, col = group_shape or (0, 0)
    if row > 1 and col > 1:
        return f"{prefix}-block"
    if row == -1 and col == -1:
        return f"{prefix}-tensor"
    return f"{prefix}-channel"


# Kernel configs of microscaled formats carry no weight key in vLLM 0.32; their class names do.
_CONFIG_SCHEMES = (("NvFp4", "nvfp4"), ("MxFp4", "mxfp4"), ("Mxfp4", "mxfp4"),
                   ("MxFp8", "mxfp8"), ("Mxfp8", "mxfp8"))


def _microscaled_scheme(wkey: layer.QuantKey) -> str | None:
    """mxfp4/mxfp8/nvfp4 from a weight key: E8M0 (uint8) or fp8 scales on small blocks."""
    e8m0 = (torch.uint8, getattr(torch, "float8_e8m0fnu", torch.uint8))
    if wkey.scale_dtype in e8m0:
        return "mxfp8" if wkey.dtype == torch.float8_e4m3fn else "mxfp4"
    if wkey.scale_dtype == torch.float8_e4m3fn and wkey.dtype == torch.uint8:
        return "nvfp4"
    return None


def _group_name(group_size: Any) -> str:
    return "channel" if group_size in (None, -1, 0) else f"g{int(group_size)}"


# Quant methods and schemes that keep no kernel object (vLLM ≤ 0.26's NVFP4/MX schemes pick
# a backend string; its GPTQ/AWQ non-Marlin methods call their ops directly).
_HOLDER_SCHEMES = (("W4A4Fp4", "nvfp4"), ("W4A16Fp4", "nvfp4"), ("NvFp4", "nvfp4"),
                   ("Nvfp4", "nvfp4"), ("Mxfp4", "mxfp4"), ("MxFp4", "mxfp4"),
                   ("Mxfp8", "mxfp8"), ("MxFp8", "mxfp8"))


def _scheme_of_layer(module: Any) -> str | None:
    """The scheme of a layer whose method holds no kernel: by its class, then its params."""
    name = type(layer.quant_holder(module)).__name__
    for marker, scheme in _HOLDER_SCHEMES:
        if marker in name:
            return scheme
    if "GPTQ" in name or "AWQ" in name:
        bits = layer.config_setting(module, "weight_bits")
        if bits:
            return f"w{int(bits)}a16-{_group_name(layer.config_setting(module, 'group_size'))}"
    values = layer.tensor(module, "weight_packed", "weight")
    scale = layer.tensor(module, "weight_scale")
    if isinstance(values, torch.Tensor) and isinstance(scale, torch.Tensor):
        if scale.dtype == torch.uint8 and values.dtype in (torch.uint8, torch.float8_e4m3fn):
            return "mxfp8" if values.dtype == torch.float8_e4m3fn else "mxfp4"
        if scale.dtype == torch.float8_e4m3fn and values.dtype == torch.uint8:
            return "nvfp4"
    return None


def scheme_of(kernel: Any, weight: torch.Tensor | None, module: Any = None) -> str:
    """Quantization scheme from the kernel config's keys, else from the weight's dtype.

    fp8/int8 scaled-mm: fp8-block, fp8-channel, …; mixed precision: w4a16-g128,
    w8a16-channel, w4a8-g128 (weight bits, activation bits, scale groups); mxfp4, mxfp8, nvfp4.
    `module`, when given, names the schemes of methods that keep no kernel object.
    """
    config = layer.kernel_config(kernel)
    wkey = layer.quant_key(layer.weight_quant_key(kernel))
    if wkey is not None:
        microscaled = _microscaled_scheme(wkey)
        if microscaled is not None:
            return microscaled
        return _group_scheme("int8" if wkey.dtype == torch.int8 else "fp8", wkey.group)
    channelwise = layer.int8_channelwise(kernel)
    if channelwise is not None:  # int8 scaled-mm configs carry flags instead of a key
        return "int8-channel" if channelwise else "int8-tensor"
    mixed = layer.mixed_precision_config(kernel)
    if mixed is not None:  # mixed precision (WNA16, W4A8)
        bits = mixed["bits"]
        group = _group_name(mixed["group_size"])
        if mixed["act_type"] in (torch.int8, torch.float8_e4m3fn):
            return f"w{bits}a8-{group}"
        if mixed["signed"]:
            # Signed int4 under bf16 activations: W4A8-int, int8 per token inside the kernel.
            return f"w{bits}a8-int8-{group}"
        return f"w{bits}a16-{group}"
    config_name = type(config).__name__ if config is not None else ""
    for marker, scheme in _CONFIG_SCHEMES:
        if marker in config_name:
            return scheme
    layer_scheme = _scheme_of_layer(module) if kernel is None and module is not None else None
    if layer_scheme is not None:
        return layer_scheme
    if weight is not None:
        if weight.dtype in _DTYPE_NAMES:
            return f"unquantized-{_DTYPE_NAMES[weight.dtype]}"
        return str(weight.dtype).replace("torch.", "")
    return "unknown"


def _function_name(fn: Any) -> str:
    fn = getattr(fn, "func", fn)  # functools.partial
    return str(getattr(fn, "__qualname__", None) or type(fn).__name__)


def _row(layer: str, layer_type: str, method: Any, kernel: str, scheme: str,
         selection: Selection | None) -> dict[str, Any]:
    attempts = selection.attempts if selection else []
    turned_down = [a.as_dict() for a in attempts if not a.accepted]
    return {
        "layer": layer,
        "layer_type": layer_type,
        "quant_method": type(method).__name__,
        "scheme": scheme,
        "kernel": kernel,
        "preferred": attempts[0].kernel if attempts else kernel,
        "turned_down": turned_down,
    }


def linear_row(name: str, module: Any, layer_type: str) -> dict[str, Any]:
    kernel = layer.linear_kernel(module)
    weight = layer.tensor(module, "weight")
    if kernel is not None:
        selection = selection_for_config(layer.kernel_config(kernel))
        return _row(name, layer_type, layer.quant_holder(module), kernel_name(kernel),
                    scheme_of(kernel, weight, module), selection)
    # Unquantized: vLLM keeps the GEMM function; on CPU the branch is set per layer.
    method = layer.quant_method(module)
    layer_selection = selection_for_layer(module)
    cpu_branch = layer.cpu_linear(module)
    if layer_selection is not None:
        chosen = layer_selection.attempts[-1].kernel
    elif cpu_branch is not None:
        from gemmguard.inventory.selection import cpu_gemm_name

        chosen = cpu_gemm_name(cpu_branch)
    else:
        chosen = _function_name(layer.unquantized_gemm(module))
    return _row(name, layer_type, method, chosen, scheme_of(None, weight, module),
                layer_selection)


def moe_row(name: str, module: Any) -> dict[str, Any]:
    method = layer.quant_method(module)
    backend = layer.moe_backend(module)
    experts = experts_of(module)
    if experts is not None:
        kernel = type(experts).__name__
        parts = layer.experts_parts(experts)
        if parts is not None:  # chosen per call by shape
            kernel += f"[{type(parts[0]).__name__}|{type(parts[1]).__name__}]"
    else:
        kernel = _function_name(layer.experts_function(module))
    from gemmguard.selfcheck.schemes import moe_scheme

    selection = selection_for_moe_config(moe_config_of(module))
    row = _row(name, "moe", method, kernel, moe_scheme(module), selection)
    row["backend"] = layer.backend_value(backend)
    return row


def kernel_report(model: torch.nn.Module) -> list[dict[str, Any]]:
    """One row per GEMM-owning module: layer, type, scheme, kernel, turned-down candidates."""
    linear, lm_head = vllm_adapter.linear_base(), vllm_adapter.lm_head_class()
    moe, attention = vllm_adapter.moe_layer_classes(), vllm_adapter.attention_class()
    rows = []
    for name, module in model.named_modules():
        if layer.quant_method(module) is not None:
            if isinstance(module, lm_head):
                rows.append(linear_row(name, module, "lm_head"))
            elif isinstance(module, linear):
                rows.append(linear_row(name, module, "linear"))
            elif moe and isinstance(module, moe):
                rows.append(moe_row(name, module))
        if attention is not None and isinstance(module, attention):
            impl = layer.attention_impl(module)
            kv_dtype = layer.kv_cache_dtype(module)
            rows.append(_row(name, "attention", impl, type(impl).__name__, f"kv-{kv_dtype}",
                             None))
    return rows
