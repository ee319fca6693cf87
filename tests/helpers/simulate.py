"""Test helper: simulated platforms for exercising fixes on a CPU box, as vLLM's tests do.

Unlike `probe`, this *does* change vLLM's `current_platform` (and the CUDA-only probes the
audit lists in §5), through a pytest-style `monkeypatch` that undoes it afterwards. Call
`clear_caches()` before and after: vLLM caches some platform answers per process.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any, Protocol


class Patcher(Protocol):
    """The part of pytest's MonkeyPatch this module uses (`pytest.MonkeyPatch.context()`)."""

    def setattr(self, target: Any, name: str, value: Any, raising: bool = ...) -> None: ...

    def setitem(self, dic: Any, name: Any, value: Any) -> None: ...


# functools.cache'd vLLM helpers whose answers depend on the platform (module, function).
CACHED = (
    ("vllm.utils.deep_gemm", "is_deep_gemm_supported"),
    ("vllm.utils.deep_gemm", "is_deep_gemm_e8m0_used"),
    ("vllm.utils.flashinfer", "is_flashinfer_fp8_blockscale_gemm_supported"),
)


def clear_caches() -> None:
    """Forget cached platform answers, so the next call sees the (un)simulated platform."""
    for module_name, name in CACHED:
        fn = getattr(importlib.import_module(module_name), name, None)
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()


# Modules that compute platform answers at import: imported before the platform changes.
IMPORT_FIRST = (
    "vllm.model_executor.kernels.linear",
    "vllm.model_executor.layers.quantization.utils.w8a8_utils",
    "vllm._aiter_ops",
)


def _platform(mp: Patcher, kind: str, capability: int) -> Any:
    for module_name in IMPORT_FIRST:
        importlib.import_module(module_name)
    from vllm.platforms import current_platform
    from vllm.platforms.interface import DeviceCapability, PlatformEnum

    cap = DeviceCapability(capability // 10, capability % 10)

    def as_int(c: int | tuple[int, int]) -> int:
        return c[0] * 10 + c[1] if isinstance(c, tuple) else c

    answers = {"is_cuda": kind == "cuda", "is_rocm": kind == "rocm", "is_cpu": False,
               "is_cuda_alike": True, "is_xpu": False}
    for name, value in answers.items():
        mp.setattr(current_platform, name, lambda *a, v=value, **k: v)
    enum = PlatformEnum.CUDA if kind == "cuda" else PlatformEnum.ROCM
    mp.setattr(current_platform, "_enum", enum)
    mp.setattr(current_platform, "get_device_capability", lambda device_id=0: cap)
    mp.setattr(current_platform, "has_device_capability",
               lambda c, device_id=0: capability >= as_int(c))
    mp.setattr(current_platform, "is_device_capability",
               lambda c, device_id=0: capability == as_int(c))
    mp.setattr(current_platform, "is_device_capability_family",
               lambda c, device_id=0: capability // 10 == c // 10)
    return current_platform


def cuda(mp: Patcher, capability: int) -> Any:
    """A CUDA GPU of `capability` (80 Ampere, 90 Hopper, 100 B200, 120 RTX PRO 6000)."""
    platform = _platform(mp, "cuda", capability)
    mp.setattr(platform, "support_deep_gemm",
               lambda: capability == 90 or capability // 10 in (10, 12))
    cutlass = importlib.import_module("vllm.model_executor.kernels.linear.scaled_mm.cutlass")
    # Computed at import from the real device; the CPU _C lacks the CUDA probe (audit §5).
    mp.setattr(cutlass, "CUTLASS_BLOCK_FP8_SUPPORTED", capability >= 90)
    mp.setattr(importlib.import_module("vllm._custom_ops"), "cutlass_scaled_mm_supports_fp8",
               lambda cc: cc >= 89, raising=False)
    return platform


def rocm_gfx950(mp: Patcher, aiter_installed: bool) -> Any:
    """An AMD MI355 (gfx950), with or without the AITER package installed."""
    platform = _platform(mp, "rocm", 95)
    # The real vllm.platforms.rocm aborts a CPU-build process on import: stand it in.
    rocm = types.ModuleType("vllm.platforms.rocm")
    for arch in ("gfx9", "gfx950", "gfx1x", "gfx11", "gfx12x", "gfx1250", "mi3xx"):
        setattr(rocm, f"on_{arch}", lambda a=arch: a in ("gfx9", "gfx950", "mi3xx"))
    rocm.get_cdna_version = lambda: 4  # type: ignore[attr-defined]
    mp.setitem(sys.modules, "vllm.platforms.rocm", rocm)
    mp.setattr(importlib.import_module("vllm._aiter_ops"), "IS_AITER_FOUND", aiter_installed)
    return platform
