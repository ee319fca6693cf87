"""vLLM general plugin: runs in every vLLM process (API server, engine core, workers).

vLLM may call `register` more than once per process, so everything here is idempotent. The
API server process of `gemmguard serve` builds no model: there it installs nothing until asked
(`defer`, `ensure_registered`), so vLLM's first line is not held up by gemmguard.
"""

from __future__ import annotations

import logging
import os

from gemmguard import ledger

# A child of vLLM's logger, so gemmguard's lines use vLLM's handler and format.
logger = logging.getLogger("vllm.gemmguard")

_REGISTERED = False
_DEFERRED = False


def defer() -> None:
    """Install nothing in this process until `ensure_registered`: for the API server process
    of `gemmguard serve`, which builds no model.

    vLLM loads its general plugins while it builds its argument parser, before its first log
    line; installing here imports vLLM's kernel modules (+0.56 s on a 2-core CPU, more on a
    GPU host: benchmarks.parser_plugins). Engine processes are spawned and register in full.
    Nothing is deferred where the model is built in this process after all
    (VLLM_ENABLE_V1_MULTIPROCESSING=0), nor under VLLM_WORKER_MULTIPROC_METHOD=fork: a forked
    engine inherits this process's state, vLLM's "plugins loaded" included, and never registers.
    """
    global _DEFERRED
    _DEFERRED = (os.environ.get("VLLM_WORKER_MULTIPROC_METHOD", "spawn") != "fork"
                 and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0")


def ensure_registered() -> None:
    """Install now what `defer` held back (what this process publishes reads the ledger)."""
    global _DEFERRED
    _DEFERRED = False
    register()

PORTABLE_KERNELS_PATCH = ledger.Patch(
    name="portable-fp8-block-kernels",
    why="FP8 block-scaled checkpoints fail to load where no vLLM kernel fits (CPUs without "
    "AMX; GPUs before the kernels' minimum capability).",
    how="Append gemmguard's portable W8A16 and W8A8 kernels to the end of "
    "_POSSIBLE_FP8_BLOCK_KERNELS for every platform, so vLLM's own kernels keep priority.",
    upstream="vLLM added Marlin as an FP8 block candidate for Ampere (seed fix 004); no "
    "portable fallback exists for CPUs without AMX in 0.32/0.33.",
    remove_when="vLLM ships a portable FP8 block-scaled kernel as a last candidate.",
)


def add_portable_kernels(test_kernels: tuple[str, ...] = ()) -> None:
    """Append the portable FP8 block kernels as the last candidate on every platform.

    `test_kernels` (GEMMGUARD_TEST_KERNELS) puts faulty kernels first, for proving the
    self-check; they exist only when asked for.
    """
    from gemmguard import vllm_adapter
    from gemmguard.kernels.faulty import build_faulty_kernels
    from gemmguard.kernels.portable_fp8_block import PORTABLE_KERNEL_NAMES, build_kernels

    lists = vllm_adapter.candidate_lists("fp8_block")
    if any(k.__name__ in PORTABLE_KERNEL_NAMES for kernels in lists.values() for k in kernels):
        return
    kernels = build_kernels()
    faulty = build_faulty_kernels(kernels[0], test_kernels)
    platform_enum = type(next(iter(lists)))
    for platform in platform_enum:  # platforms vLLM lists none for (e.g. OOT) get them too
        lists.setdefault(platform, [])
    for platform_kernels in lists.values():
        platform_kernels[:0] = faulty
        platform_kernels.extend(kernels)
    ledger.record(PORTABLE_KERNELS_PATCH)


FAULTY_MOE_PATCH = ledger.Patch(
    name="faulty-moe-test-kernels",
    why="The MoE self-check must be proven to catch faulty experts kernels, on the kernel vLLM "
    "itself chooses for the layer, without a GPU.",
    how="Rebind backend_to_kernel_cls in vLLM's unquantized MoE oracle so that, for the CPU "
    "backend, the faulty experts named in GEMMGUARD_TEST_KERNELS come before vLLM's own.",
    upstream="none: test-only, never applied unless GEMMGUARD_TEST_KERNELS names a moe-* kernel.",
    remove_when="vLLM offers a way to register an extra MoE experts candidate.",
)


def add_faulty_moe_kernels(test_kernels: tuple[str, ...] = ()) -> None:
    """Put the faulty MoE experts named in `test_kernels` first for the CPU unquantized MoE."""
    from gemmguard.kernels.faulty_moe import FAULTY_MOE_KERNELS, build_faulty_moe_kernels
    from gemmguard.vllm_adapter import moe

    names = tuple(n for n in test_kernels if n in FAULTY_MOE_KERNELS)
    honest = moe.cpu_unquantized_experts_class() if names else None
    if honest is None:
        return
    faulty = build_faulty_moe_kernels(honest, names)

    def with_faulty(backend: object, classes: list[type]) -> list[type]:
        return [*faulty, *classes] if moe.is_cpu_backend(backend) else classes

    if moe.wrap_unquantized_moe_candidates(with_faulty):
        ledger.record(FAULTY_MOE_PATCH)


def register() -> None:
    """Entry point of `vllm.general_plugins`: install gemmguard's engine-side hooks once."""
    global _REGISTERED
    if _REGISTERED:
        return
    from gemmguard.config import settings

    cfg = settings()
    if cfg.test_loader == "bypass":  # vLLM checks --load-format in every process
        from gemmguard.vllm_adapter import bypass_loader

        bypass_loader.register()
    if _DEFERRED:
        return
    _REGISTERED = True
    from gemmguard import fixes
    from gemmguard.inventory import selection
    from gemmguard.selfcheck import load_check

    add_portable_kernels(cfg.test_kernels)
    # Before selection.install, whose wrapper (outside this one) applies the deny list.
    add_faulty_moe_kernels(cfg.test_kernels)
    selection.install(cfg.deny_kernels)
    load_check.install(load_check.CheckConfig(
        policy=cfg.selfcheck_policy, unchecked=cfg.selfcheck_unchecked,
        report_file=cfg.selfcheck_report_file))
    # After the candidate lists are final, so the fixes see what vLLM will choose from.
    fixes.apply_all(cfg)
    logger.debug("gemmguard general plugin loaded")
