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
from gemmguard.vllm_adapter.moe import moe_config_of

# Where quant methods (or their compressed-tensors / Quark scheme) keep the kernel instance.
KERNEL_ATTRS = ("fp8_linear", "kernel", "linear_kernel", "ocp_mx_linear")
MOE_BACKEND_ATTRS = (
    "fp8_backend", "nvfp4_backend", "mxfp4_backend", "mxfp8_backend", "w4a8_backend",
    "wna16_backend", "wna16_moe_backend", "int8_backend", "unquantized_backend", "backend",
)
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def kernel_of(holder: Any) -> Any:
    for attr in KERNEL_ATTRS:
        kernel = getattr(holder, attr, None)
        if kernel is not None and not isinstance(kernel, type) and hasattr(kernel, "config"):
            return kernel
    return None


def kernel_name(kernel: Any) -> str:
    name = type(kernel).__name__
    # Kernels that pick a sub-kernel per call by shape (e.g. M<32 FlashInfer, else DeepGEMM).
    base, fallback = getattr(kernel, "base", None), getattr(kernel, "fallback", None)
    if base is not None and fallback is not None:
        name += f"[{type(base).__name__}|{type(fallback).__name__}]"
    return name


def _group_scheme(prefix: str, group_shape: Any) -> str:
    row, col = int(getattr(group_shape, "row", 0)), int(getattr(group_shape, "col", 0))
    if row > 1 and col > 1:
        return f"{prefix}-block"
    if row == -1 and col == -1:
        return f"{prefix}-tensor"
    return f"{prefix}-channel"


# Kernel configs of microscaled formats carry no weight key in vLLM 0.32; their class names do.
_CONFIG_SCHEMES = (("NvFp4", "nvfp4"), ("MxFp4", "mxfp4"), ("Mxfp4", "mxfp4"),
                   ("MxFp8", "mxfp8"), ("Mxfp8", "mxfp8"))


def _microscaled_scheme(wkey: Any) -> str | None:
    """mxfp4/mxfp8/nvfp4 from a weight key: E8M0 (uint8) or fp8 scales on small blocks."""
    scale = getattr(wkey, "scale", None)
    scale_dtype = getattr(scale, "dtype", None)
    e8m0 = (torch.uint8, getattr(torch, "float8_e8m0fnu", torch.uint8))
    if scale_dtype in e8m0:
        return "mxfp8" if getattr(wkey, "dtype", None) == torch.float8_e4m3fn else "mxfp4"
    if scale_dtype == torch.float8_e4m3fn and getattr(wkey, "dtype", None) == torch.uint8:
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
    holder = getattr(module, "scheme", None) or getattr(module, "quant_method", None)
    name = type(holder).__name__
    for marker, scheme in _HOLDER_SCHEMES:
        if marker in name:
            return scheme
    if "GPTQ" in name or "AWQ" in name:
        config = getattr(holder, "quant_config", None)
        bits = getattr(config, "weight_bits", None)
        if bits:
            return f"w{int(bits)}a16-{_group_name(getattr(config, 'group_size', None))}"
    values = getattr(module, "weight_packed", None)
    values = values if isinstance(values, torch.Tensor) else getattr(module, "weight", None)
    scale = getattr(module, "weight_scale", None)
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
    config = getattr(kernel, "config", None)
    wkey = getattr(config, "weight_quant_key", None)
    if wkey is not None:
        microscaled = _microscaled_scheme(wkey)
        if microscaled is not None:
            return microscaled
        dtype = getattr(wkey, "dtype", None)
        prefix = "int8" if dtype == torch.int8 else "fp8"
        return _group_scheme(prefix, getattr(getattr(wkey, "scale", None), "group_shape", None))
    weight_type = getattr(config, "weight_type", None)
    if weight_type is not None:  # mixed precision (WNA16, W4A8)
        bits = getattr(weight_type, "size_bits", None)
        act = getattr(config, "act_type", None)
        group = _group_name(getattr(config, "group_size", None))
        if act in (torch.int8, torch.float8_e4m3fn):
            return f"w{bits}a8-{group}"
        if getattr(weight_type, "is_signed", lambda: False)():
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
    method = module.quant_method
    holder = getattr(module, "scheme", None)
    kernel = (kernel_of(holder) if holder is not None else None) or kernel_of(method)
    weight = getattr(module, "weight", None)
    if kernel is not None:
        selection = selection_for_config(kernel.config)
        return _row(name, layer_type, holder or method, kernel_name(kernel),
                    scheme_of(kernel, weight, module), selection)
    # Unquantized: vLLM keeps the GEMM function; on CPU the branch is set per layer.
    layer_selection = selection_for_layer(module)
    if layer_selection is not None:
        chosen = layer_selection.attempts[-1].kernel
    elif hasattr(module, "cpu_linear"):
        from gemmguard.inventory.selection import cpu_gemm_name

        chosen = cpu_gemm_name(module.cpu_linear)
    else:
        chosen = _function_name(getattr(method, "_gemm_impl", None) or method.apply)
    return _row(name, layer_type, method, chosen, scheme_of(None, weight, module),
                layer_selection)


def moe_row(name: str, module: Any) -> dict[str, Any]:
    method = module.quant_method
    backend = next((getattr(method, a) for a in MOE_BACKEND_ATTRS
                    if getattr(method, a, None) is not None), None)
    moe_kernel = getattr(method, "moe_kernel", None)
    experts = getattr(moe_kernel, "fused_experts", None)
    if experts is not None:
        kernel = type(experts).__name__
        if hasattr(experts, "fallback_experts"):  # chosen per call by shape
            parts = (type(experts.experts).__name__, type(experts.fallback_experts).__name__)
            kernel += f"[{parts[0]}|{parts[1]}]"
    else:
        kernel = _function_name(getattr(method, "experts_cls", None) or method)
    from gemmguard.selfcheck.schemes import moe_scheme

    selection = selection_for_moe_config(moe_config_of(module))
    row = _row(name, "moe", method, kernel, moe_scheme(module), selection)
    row["backend"] = str(getattr(backend, "value", backend) or "")
    return row


def kernel_report(model: torch.nn.Module) -> list[dict[str, Any]]:
    """One row per GEMM-owning module: layer, type, scheme, kernel, turned-down candidates."""
    linear, lm_head = vllm_adapter.linear_base(), vllm_adapter.lm_head_class()
    moe, attention = vllm_adapter.moe_layer_classes(), vllm_adapter.attention_class()
    rows = []
    for name, module in model.named_modules():
        if getattr(module, "quant_method", None) is not None:
            if isinstance(module, lm_head):
                rows.append(linear_row(name, module, "lm_head"))
            elif isinstance(module, linear):
                rows.append(linear_row(name, module, "linear"))
            elif moe and isinstance(module, moe):
                rows.append(moe_row(name, module))
        if attention is not None and isinstance(module, attention):
            impl = getattr(module, "impl", None)
            kv_dtype = str(getattr(module, "kv_cache_dtype", "auto"))
            rows.append(_row(name, "attention", impl, type(impl).__name__, f"kv-{kv_dtype}",
                             None))
    return rows
