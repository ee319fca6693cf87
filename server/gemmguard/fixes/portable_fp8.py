"""Fix 6: an FP8 block-scaled kernel that runs on this machine, for every platform."""

from __future__ import annotations

from gemmguard import ledger, vllm_adapter
from gemmguard.config import Settings
from gemmguard.fixes import Changes, Finding, Fix, FixNotPatchable
from gemmguard.kernels.portable_fp8_block import PORTABLE_KERNEL_NAMES
from gemmguard.vllm_adapter import fixes as engine

NAME = "portable-fp8"


def usable_kernels(include_portable: bool) -> tuple[list[str], list[str]]:
    """(kernels that would take an FP8 block layer here, reasons the others turned it down).

    vLLM's own candidates, plus gemmguard's portable ones if `include_portable`; never the
    faulty test kernels (GEMMGUARD_TEST_KERNELS), which are gemmguard's too but fix nothing.
    """
    config = engine.fp8_block_config()
    # vLLM's own per-candidate check (capability, VLLM_DISABLED_KERNELS, gemmguard's deny list).
    check = engine.linear_kernels_module().is_supported_and_can_implement_kernel
    usable, reasons = [], []
    for kernel in engine.fp8_block_candidates():
        portable = include_portable and kernel.__name__ in PORTABLE_KERNEL_NAMES
        if _from_gemmguard(kernel) and not portable:
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


def _from_gemmguard(kernel: type) -> bool:
    return kernel.__module__.partition(".")[0] == "gemmguard"


def detect() -> Finding:
    """Behaviour: ask vLLM's own candidates (not gemmguard's) to take an FP8 block layer."""
    usable, reasons = usable_kernels(include_portable=False)
    if usable:
        return Finding("upstream", f"vLLM's {usable[0]} takes FP8 block layers on "
                       f"{engine.platform_label()}")
    why = "; ".join(reasons) or "no candidates for this platform"
    return Finding("missing", f"no vLLM FP8 block kernel on {engine.platform_label()} ({why})",
                   ("kernel",))


def patch(settings: Settings, finding: Finding, changes: Changes) -> str:
    """Make sure gemmguard's portable kernels are the last candidates, and that one is usable."""
    from gemmguard.plugin import PORTABLE_KERNELS_PATCH, add_portable_kernels

    lists = vllm_adapter.candidate_lists("fp8_block")
    changes.keep_contents(lists, "FP8 block candidate lists")
    for platform, kernels in lists.items():
        changes.keep_contents(kernels, f"FP8 block candidates of {platform}")
    if PORTABLE_KERNELS_PATCH not in ledger.applied():
        changes.call("ledger portable-fp8-block-kernels", lambda: None,
                     lambda: ledger.withdraw(PORTABLE_KERNELS_PATCH.name))
    add_portable_kernels()  # idempotent; records its ledger Patch
    usable, reasons = usable_kernels(include_portable=True)
    if not usable:
        raise FixNotPatchable(f"the portable kernels are registered but unusable: {reasons}")
    return f"{usable[0]} (gemmguard) takes FP8 block layers"


def verify(settings: Settings) -> Finding:
    """The second probe: a kernel, vLLM's or gemmguard's portable one, takes FP8 block layers."""
    usable, reasons = usable_kernels(include_portable=True)
    if usable:
        return Finding("upstream", f"{usable[0]} takes FP8 block layers")
    return Finding("missing", f"no kernel takes FP8 block layers: {'; '.join(reasons)}",
                   ("kernel",))


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
    verify=verify,
)
