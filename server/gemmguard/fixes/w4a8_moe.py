"""Fix 2: W4A8-FP8 weights: sync before the CUTLASS reorder; a scale reshape torch accepts."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch

from gemmguard import ledger
from gemmguard.config import Settings
from gemmguard.fixes import Changes, Finding, Fix, FixNotPatchable, probe
from gemmguard.vllm_adapter import fixes as engine

NAME = "w4a8-moe"
CONVERT = "convert_packed_uint4b8_to_signed_int4_inplace"
REORDERS = ("cutlass_encode_and_reorder_int4b_grouped", "cutlass_encode_and_reorder_int4b")
RESHAPE = "convert_bf16_scales_to_fp8"

SYNC_PATCH = ledger.Patch(
    name="w4a8-sync-before-reorder",
    why="The in-place int4 conversion and the CUTLASS reorder run on different streams; "
    "without a sync the reorder can read half-converted weights (garbled output at TP>1).",
    how="Wrap vllm._custom_ops.cutlass_encode_and_reorder_int4b[_grouped] (looked up as "
    "ops.<name> at call time) to synchronize the device first.",
    upstream="Seed fix 001 (sync in fused_moe/oracle/w4a8.py and mixed_precision/cutlass.py).",
    remove_when="The pinned vLLM synchronizes between the conversion and the reorder.",
)
RESHAPE_PATCH = ledger.Patch(
    name="w4a8-scale-reshape",
    why="convert_bf16_scales_to_fp8 reshaped channel scales with a (torch.Size, int) view, "
    "which PyTorch 2.11+ rejects, so W4A8 checkpoints failed to load.",
    how="Replace quant_utils.convert_bf16_scales_to_fp8, and every binding of it, with one "
    "that reshapes with view(*shape[:-1], -1).",
    upstream="Seed fix 001 (quant_utils.py, `chan_scales.view(*orig_shape[:-1], -1)`).",
    remove_when="The pinned vLLM reshapes with view(*shape[:-1], -1).",
)


def _probe_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # A per-row FP8 quantizer standing in for QuantFP8(static=False, PER_TOKEN).
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 448.0
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def reshape_ok() -> tuple[bool, str]:
    """Behaviour: convert a 3-D (experts, N, K/group) scale tensor, as MoE layers do."""
    scales = torch.linspace(0.01, 1.0, 2 * 8 * 4, dtype=torch.bfloat16).reshape(2, 8, 4)
    try:
        fp8, chan = engine.quant_utils().convert_bf16_scales_to_fp8(
            _probe_quant, scales.as_subclass(probe.FakeCudaTensor)
        )
    except (TypeError, RuntimeError) as exc:
        return False, f"fails on a (2, 8, 4) scale tensor: {exc}".splitlines()[0]
    restored = fp8.as_subclass(torch.Tensor).float() * chan.as_subclass(torch.Tensor)
    if tuple(chan.shape) != (2, 8, 1) or not torch.allclose(restored, scales.float(), rtol=0.07):
        return False, f"gives channel scales of shape {tuple(chan.shape)}, expected (2, 8, 1)"
    return True, "reshape ok (probed on a CPU tensor)"


def _unsynced(fn: Any, synced_reorders: frozenset[str]) -> bool:
    """True if some int4 conversion in `fn` reaches a CUTLASS reorder with no sync between."""
    for names in probe.names_in_order(fn):
        pending = False
        for name in names:
            if name == CONVERT:
                pending = True
            elif name == "synchronize":
                pending = False
            elif name in REORDERS and pending and name not in synced_reorders:
                return True
    return False


def sync_ok() -> tuple[bool, str]:
    """Bytecode: a stream race cannot be provoked on a CPU, so read the call order instead.

    A reorder op that itself synchronizes first (probed by calling it under stand-ins, as
    gemmguard's patch makes it) counts as a sync before the reorder.
    """
    ops = engine.custom_ops()
    synced = frozenset(n for n in REORDERS if probe.synchronizes_first(getattr(ops, n, None)))
    sites = {
        "MoE oracle": engine.w4a8_moe_converter(),
        "linear kernel": engine.cutlass_w4a8_linear_kernel().process_weights_after_loading,
    }
    bad = [where for where, fn in sites.items() if _unsynced(fn, synced)]
    if bad:
        return False, f"no sync between int4 conversion and reorder in {bad} (read from bytecode)"
    if synced:
        return True, f"sync ok (the reorder ops {sorted(synced)} synchronize first)"
    return True, "sync ok (read from bytecode: no behavioural probe for a stream race)"


def detect() -> Finding:
    """Reshape by behaviour; sync by the order of calls in vLLM's bytecode."""
    parts = {"reshape": reshape_ok(), "sync": sync_ok()}
    missing = tuple(name for name, (ok, _) in parts.items() if not ok)
    detail = "; ".join(text for _, text in parts.values())
    return Finding("missing" if missing else "upstream", detail, missing)


def _synchronized(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def reorder(*args: Any, **kwargs: Any) -> Any:
        accelerator = getattr(torch, "accelerator", None)
        (accelerator.synchronize if accelerator else torch.cuda.synchronize)()
        return fn(*args, **kwargs)

    reorder.__gemmguard_fix__ = NAME  # type: ignore[attr-defined]  # a function attribute
    return reorder


def convert_bf16_scales_to_fp8(
    quant_fp8: Callable[..., Any], scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's conversion of BF16 group scales to (fp8 scales, channel scales), reshape fixed."""
    orig_shape = scales.shape
    fp8_scales, chan_scales = quant_fp8(scales.view(-1, orig_shape[-1]))
    fp8_scales = (fp8_scales.float() / 8.0).to(torch.float8_e4m3fn)
    chan_scales = chan_scales * 8.0
    return fp8_scales.view(orig_shape), chan_scales.view(*orig_shape[:-1], -1)


# A function attribute (mypy types functions without attributes).
convert_bf16_scales_to_fp8.__gemmguard_fix__ = NAME  # type: ignore[attr-defined]


def patch(settings: Settings, finding: Finding, changes: Changes) -> str:
    """Wrap the reorder ops with a sync; swap in the fixed scale conversion everywhere."""
    done = []
    if "sync" in finding.missing_parts:
        ops = engine.custom_ops()
        absent = [name for name in REORDERS if getattr(ops, name, None) is None]
        if absent:
            raise FixNotPatchable(f"vllm._custom_ops has no {absent} to synchronize before")
        for name in REORDERS:
            current = getattr(ops, name)
            if getattr(current, "__gemmguard_fix__", None) != NAME:
                changes.setattr(ops, name, _synchronized(current))
        changes.record(SYNC_PATCH)
        done.append("sync before the CUTLASS int4 reorder")
    if "reshape" in finding.missing_parts:
        old = getattr(engine.quant_utils(), RESHAPE)
        for name, module in list(sys.modules.items()):  # callers import it by name
            if name.startswith("vllm.") and vars(module).get(RESHAPE) is old:
                changes.setattr(module, RESHAPE, convert_bf16_scales_to_fp8)
        changes.record(RESHAPE_PATCH)
        done.append("scale reshape replaced")
    return ", ".join(done)


FIX = Fix(
    name=NAME,
    title="W4A8-FP8 MoE: sync before the CUTLASS int4 reorder; scale reshape for PyTorch 2.11+",
    consequence="W4A8-FP8 MoE checkpoints give garbled output at TP>1, or fail to load on "
    "PyTorch 2.11+.",
    remedy="Serve W4A8 MoE checkpoints with TP=1, or use a vLLM with seed fix 001 (0.26+).",
    hardware="CUDA GPUs (CUTLASS W4A8 kernels)",
    applies=lambda: bool(engine.platform().is_cuda()),
    detect=detect,
    patch=patch,
)
