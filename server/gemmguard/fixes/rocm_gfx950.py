"""Fix 3: ROCm gfx950: BF16 DeepSeek attention projections; AITER tgemm gated and size-guarded."""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable
from typing import Any

import torch

from gemmguard import ledger
from gemmguard.config import Settings
from gemmguard.fixes import Changes, Finding, Fix, probe
from gemmguard.vllm_adapter import fixes as engine

NAME = "rocm-gfx950"
# AITER's gfx950 A16W16 kernel addresses C with int32 offsets and reads A/B through 4 GiB
# buffer descriptors (ROCm/aiter#6853); vLLM 0.33 skips tgemm past these sizes.
_UNSAFE_N, _UNSAFE_M, _K = 1 << 16, 1 << 15, 64  # n * m == 2**31

MXFP4_PATCH = ledger.Patch(
    name="quark-no-dynamic-mxfp4",
    why="Dynamic MXFP4 activation quantization of DeepSeek attention projections was slower "
    "than AITER's tuned BF16 GEMMs on gfx950.",
    how="Wrap QuarkConfig.maybe_update_config to leave dynamic_mxfp4_quant False.",
    upstream="Seed fix 002; the flag is gone by 0.32 (added in #34157; #42754 closed).",
    remove_when="The pinned vLLM has no dynamic_mxfp4_quant flag.",
)
GATE_PATCH = ledger.Patch(
    name="aiter-tgemm-gate",
    why="AITER tgemm must be used only with AITER installed, VLLM_ROCM_USE_AITER(_LINEAR) on "
    "and a gfx950 GPU; otherwise the GEMM imports aiter.tuned_gemm and crashes, or runs untuned.",
    how="Replace rocm_aiter_ops.is_tgemm_enabled (looked up per call) with that conjunction.",
    upstream="Seed fix 002 (_aiter_ops.py is_tgemm_enabled with @if_aiter_supported).",
    remove_when="The pinned vLLM gates tgemm itself (0.32 and later do).",
)
GUARD_PATCH = ledger.Patch(
    name="aiter-tgemm-large-shape-guard",
    why="AITER tgemm overflows int32 offsets / 4 GiB descriptors on very large GEMMs "
    "(ROCm/aiter#6853).",
    how="Rebind vllm.model_executor.layers.utils.rocm_unquantized_gemm (returned by "
    "dispatch_unquantized_gemm at layer construction) to use F.linear past 2**31 outputs or 4 GiB.",
    upstream="vLLM 0.33 model_executor/layers/utils.py:423-429 (aiter_hgemm_unsafe).",
    remove_when="The pinned vLLM is 0.33 or later.",
)


def mxfp4_ok() -> tuple[bool, str]:
    """Behaviour: an AMD DeepSeek-V3 MXFP4 export's excluded attention projection stays BF16."""
    layer = "model.layers.0.self_attn.q_a_proj"  # listed in the exports' "exclude"
    quant = {"global_quant_config": {"weight": {"dtype": "fp4"}}, "exclude": [layer]}
    quark = engine.quark_config_class()
    config = quark(quant_config=quant)
    if "maybe_update_config" in vars(quark):  # 0.26 turned dynamic MXFP4 on here
        # A stand-in for the two PretrainedConfig fields Quark reads.
        hf: Any = types.SimpleNamespace(model_type="deepseek_v3", quantization_config=quant)
        config.maybe_update_config("deepseek-ai/DeepSeek-R1-MXFP4", hf_config=hf)
    if getattr(config, "dynamic_mxfp4_quant", False):
        return False, "Quark turns on dynamic MXFP4 for DeepSeek attention projections"
    if hasattr(config, "get_quant_method_target"):  # 0.32+: what the layer will get
        method = config.get_quant_method_target(layer, engine.linear_base())[2]
        if getattr(method, "__name__", None) != "UnquantizedLinearMethod":
            return False, f"an excluded attention projection gets {method!r}, not BF16"
    return True, "attention projections stay BF16"


def gate_ok() -> tuple[bool, str]:
    """Behaviour: tgemm is on exactly when AITER is usable, enabled, linear-enabled, gfx950."""
    aiter = engine.aiter_ops_module()
    ops = aiter.rocm_aiter_ops
    if not hasattr(ops, "is_tgemm_enabled"):
        return False, "no is_tgemm_enabled gate for AITER tgemm"
    usable = bool(aiter.is_aiter_found_and_supported()) and engine.on_gfx950()
    for enabled, linear in itertools.product((False, True), repeat=2):
        # A subclass reads these settings instead of the class's import-time env values.
        variant: Any = type("GemmguardTgemmProbe", (ops,), {
            "_AITER_ENABLED": enabled, "_LINEAR_ENABLED": linear})
        try:
            got = bool(variant.is_tgemm_enabled())
        except Exception as exc:
            return False, f"is_tgemm_enabled raised {exc!r} (AITER={enabled}, linear={linear})"
        if got != (usable and enabled and linear):
            return False, (f"tgemm {'on' if got else 'off'} with AITER usable={usable}, "
                           f"VLLM_ROCM_USE_AITER={enabled}, _LINEAR={linear}")
    return True, f"tgemm gated (AITER usable here: {usable})"


def _guard_in_front() -> bool:
    """Behaviour: the GEMM vLLM dispatches to keeps a 2**31-output GEMM from what it wraps.

    Probes a wrapper in front of vLLM's ROCm GEMM (gemmguard's patch) with tgemm forced on and
    the wrapped GEMM replaced by a recorder, on meta tensors of two sizes.
    """
    entry = engine.layers_utils().rocm_unquantized_gemm
    if not isinstance(entry, types.FunctionType) or "original" not in entry.__code__.co_freevars:
        return False
    reached: list[tuple[int, ...]] = []

    def original(layer: Any, x: torch.Tensor, weight: torch.Tensor, bias: Any = None) -> Any:
        reached.append(tuple(x.shape))
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    run = probe.with_closure(probe.with_globals(entry, {"_tgemm_enabled": lambda: True}),
                             {"original": original})
    for n, m in ((16, 64), (_UNSAFE_N, _UNSAFE_M)):
        x = torch.empty((n, _K), device="meta", dtype=torch.bfloat16)
        run(None, x, torch.empty((m, _K), device="meta", dtype=torch.bfloat16), None)
    return reached == [(16, _K)]


def guard_ok() -> tuple[bool, str]:
    """Behaviour: run vLLM's ROCm GEMM with tgemm forced on, on meta tensors of two sizes."""
    if _guard_in_front():
        return True, "large shapes bypass tgemm (gemmguard's guard in front of vLLM's GEMM)"
    calls: list[tuple[int, ...]] = []

    def mm(x: torch.Tensor, w: torch.Tensor, b: Any = None) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    tgemm = types.SimpleNamespace(mm=mm)
    rocm = types.SimpleNamespace(**{f"on_{a}": (lambda a=a: a in ("gfx9", "gfx950"))
                                    for a in ("gfx9", "gfx950", "gfx1x", "gfx11", "gfx1250")})
    fake_envs = types.SimpleNamespace(VLLM_BATCH_INVARIANT=False, VLLM_ROCM_USE_SKINNY_GEMM=False)
    impl = probe.with_globals(
        engine.layers_utils().rocm_unquantized_gemm_impl,
        {"envs": fake_envs, "rocm_aiter_ops": types.SimpleNamespace(is_tgemm_enabled=lambda: True),
         "num_compute_units": lambda *a: 256, "wvsplitkrc_dispatch": lambda *a: (None, False),
         "use_aiter_triton_gemm": lambda *a: False},
        imports={"vllm.platforms.rocm": rocm,
                 "aiter.tuned_gemm": types.SimpleNamespace(tgemm=tgemm)},
    )
    for n, m in ((16, 64), (_UNSAFE_N, _UNSAFE_M)):
        x = torch.empty((n, _K), device="meta", dtype=torch.bfloat16)
        impl(x, torch.empty((m, _K), device="meta", dtype=torch.bfloat16), None)
    if calls[:1] != [(16, _K)]:
        return False, "probe inconclusive: tgemm was not reached for a small GEMM"
    if len(calls) > 1:
        return False, "tgemm used for a GEMM with 2**31 outputs (int32 overflow, ROCm/aiter#6853)"
    return True, "large shapes bypass tgemm"


def detect() -> Finding:
    """Each part by behaviour: the Quark config, the tgemm gate, the tgemm size guard."""
    parts = {"mxfp4": mxfp4_ok(), "gate": gate_ok(), "guard": guard_ok()}
    missing = tuple(name for name, (ok, _) in parts.items() if not ok)
    detail = "; ".join(text for _, text in parts.values())
    return Finding("missing" if missing else "upstream", detail, missing)


def _no_dynamic_mxfp4(original: Any) -> Any:
    def maybe_update_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        self.dynamic_mxfp4_quant = False
        return result

    # A function attribute (mypy types functions without attributes).
    maybe_update_config.__gemmguard_fix__ = NAME  # type: ignore[attr-defined]
    return maybe_update_config


def _guarded(original: Callable[..., torch.Tensor]) -> Any:
    def rocm_unquantized_gemm(layer: Any, x: torch.Tensor, weight: torch.Tensor,
                              bias: torch.Tensor | None = None) -> torch.Tensor:
        n, (m, k) = x.numel() // x.size(-1), weight.shape
        unsafe = n * m >= 1 << 31 or max(n, m) * k * x.element_size() >= 1 << 32
        if unsafe and _tgemm_enabled():
            return torch.nn.functional.linear(x, weight, bias)
        return original(layer, x, weight, bias)

    # Function attributes on both lines (mypy types functions without attributes).
    rocm_unquantized_gemm.__gemmguard_fix__ = NAME  # type: ignore[attr-defined]
    rocm_unquantized_gemm.__wrapped__ = original  # type: ignore[attr-defined]
    return rocm_unquantized_gemm


def _tgemm_enabled() -> bool:
    """vLLM's answer, per call (a module function so that the guard's probe can replace it)."""
    return bool(engine.aiter_ops_module().rocm_aiter_ops.is_tgemm_enabled())


def _gated(cls: Any) -> bool:
    # Never true without AITER: the caller then imports aiter.tuned_gemm and would crash.
    aiter = engine.aiter_ops_module()
    return bool(aiter.is_aiter_found_and_supported() and cls._AITER_ENABLED
                and cls._LINEAR_ENABLED and engine.on_gfx950())


_gated.__gemmguard_fix__ = NAME  # type: ignore[attr-defined]  # a function attribute


def patch(settings: Settings, finding: Finding, changes: Changes) -> str:
    """Keep dynamic MXFP4 off; gate tgemm on AITER and gfx950; guard it by size."""
    done = []
    if "mxfp4" in finding.missing_parts:
        quark = engine.quark_config_class()
        if getattr(quark.maybe_update_config, "__gemmguard_fix__", None) != NAME:
            changes.setattr(quark, "maybe_update_config",
                            _no_dynamic_mxfp4(quark.maybe_update_config))
        changes.record(MXFP4_PATCH)
        done.append("dynamic MXFP4 kept off")
    if "guard" in finding.missing_parts:
        utils = engine.layers_utils()
        if getattr(utils.rocm_unquantized_gemm, "__gemmguard_fix__", None) != NAME:
            changes.setattr(utils, "rocm_unquantized_gemm",
                            _guarded(utils.rocm_unquantized_gemm))
        changes.record(GUARD_PATCH)
        done.append("tgemm size guard added")
    if "gate" in finding.missing_parts:
        ops = engine.aiter_ops_module().rocm_aiter_ops
        if getattr(ops.is_tgemm_enabled, "__gemmguard_fix__", None) != NAME:
            # Looked up at call time by the GEMM.
            changes.setattr(ops, "is_tgemm_enabled", classmethod(_gated))
        changes.record(GATE_PATCH)
        done.append("tgemm gated on AITER, AITER linear and gfx950")
    return ", ".join(done)


FIX = Fix(
    name=NAME,
    title="ROCm gfx950: BF16 DeepSeek attention projections; AITER tgemm gated and size-guarded",
    consequence="Slower DeepSeek attention (dynamic MXFP4), a crash when tgemm is enabled without "
    "AITER, or wrong results from tgemm on very large GEMMs.",
    remedy="Set VLLM_ROCM_USE_AITER_LINEAR=0 to keep unquantized GEMMs off AITER tgemm.",
    hardware="AMD gfx950 GPUs (MI350/MI355)",
    applies=lambda: bool(engine.platform().is_rocm()) and engine.on_gfx950(),
    detect=detect,
    patch=patch,
)
