"""Fix 6: an FP8 block-scaled kernel that runs on this machine, for every platform."""

from __future__ import annotations

from gemmguard.config import Settings
from gemmguard.fixes import Finding, Fix, FixNotPatchable
from gemmguard.kernels.portable_fp8_block import PORTABLE_KERNEL_NAMES
from gemmguard.vllm_adapter import fixes as engine

NAME = "portable-fp8"


def usable_kernels(include_portable: bool) -> tuple[list[str], list[str]]:
    """(kernels that would take an FP8 block layer here, reasons the others turned it down)."""
    config = engine.fp8_block_config()
    # vLLM's own per-candidate check (capability, VLLM_DISABLED_KERNELS, gemmguard's deny list).
    check = engine.linear_kernels_module().is_supported_and_can_implement_kernel
    usable, reasons = [], []
    for kernel in engine.fp8_block_candidates():
        if kernel.__name__ in PORTABLE_KERNEL_NAMES and not include_portable:
            continue
        try:
            ok, reason = check(kernel, config, None)
        except Exception:  # e.g. a gate that needs the model's config: not usable blind
            ok, reason = False, f"{kernel.__name__} could not be asked outside model loading"
        if ok:
            usable.append(kernel.__name__)
        else:
            reasons.append(str(reason).strip().rstrip("."))
    return usable, reasons


def detect() -> Finding:
    """Behaviour: ask vLLM's own candidates (not gemmguard's) to take an FP8 block layer."""
    usable, reasons = usable_kernels(include_portable=False)
    if usable:
        return Finding("upstream", f"vLLM's {usable[0]} takes FP8 block layers on "
                       f"{engine.platform_label()}")
    why = "; ".join(reasons) or "no candidates for this platform"
    return Finding("missing", f"no vLLM FP8 block kernel on {engine.platform_label()} ({why})",
                   ("kernel",))


def patch(settings: Settings, finding: Finding) -> str:
    """Make sure gemmguard's portable kernels are the last candidates, and that one is usable."""
    from gemmguard.plugin import add_portable_kernels  # idempotent; records its ledger Patch

    add_portable_kernels()
    usable, reasons = usable_kernels(include_portable=True)
    if not usable:
        raise FixNotPatchable(f"the portable kernels are registered but unusable: {reasons}")
    return f"{usable[0]} (gemmguard) takes FP8 block layers"


FIX = Fix(
    name=NAME,
    title="FP8 block-scaled checkpoints load on every platform (portable kernel)",
    consequence="FP8 block-scaled checkpoints fail to load: 'Failed to find a kernel that can "
    "implement the ScaledMM linear layer' (e.g. CPUs without AMX).",
    remedy="Serve a BF16 checkpoint on this machine, or a machine whose vLLM has a kernel.",
    hardware="every platform",
    applies=lambda: True,
    detect=detect,
    patch=patch,
)
