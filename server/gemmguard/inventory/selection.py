"""Capture vLLM's kernel choices as they are made, and enforce gemmguard's deny list.

vLLM picks a linear kernel per layer in `create_weights` by walking a candidate list and
asking each class `is_supported` / `can_implement`; the reasons for turning a candidate down
are thrown away unless nothing fits. gemmguard wraps the two names the choosers look up at
call time and keeps, per kernel config object, the ordered list of attempts. The report
(`inventory.report`) later finds that list through the kernel instance's `.config`.
vLLM's MoE oracles do the same per layer with `is_supported_config`; their attempts are kept
per `FusedMoEConfig`, which the layer's quant method keeps as `.moe`.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from gemmguard import ledger, vllm_adapter
from gemmguard.vllm_adapter import layer as layer_view

DENIED = "denied"
SELFCHECK = "selfcheck"
# A candidate that passed the self-check but was slower than the one chosen instead.
SLOWER = "selfcheck: slower than the chosen replacement"


@dataclass
class Attempt:
    """One candidate vLLM considered: accepted, or turned down with vLLM's reason."""

    kernel: str
    accepted: bool
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "accepted": self.accepted, "reason": self.reason}


@dataclass
class Selection:
    """The ordered attempts of one kernel choice."""

    attempts: list[Attempt] = field(default_factory=list)

    @property
    def turned_down(self) -> list[Attempt]:
        return [a for a in self.attempts if not a.accepted]


# id(kernel config) → its selection; configs live as long as their kernels.
_BY_CONFIG: dict[int, Selection] = {}
# Layer object id → selection of the CPU unquantized GEMM dispatch.
_BY_LAYER: dict[int, Selection] = {}
# id(FusedMoEConfig) → the MoE oracle's latest choice for it; configs live as long as layers.
_BY_MOE_CONFIG: dict[int, Selection] = {}
_ACTIVE: list[Selection] = []
# Denied class name → the reason recorded for it ("denied", or "selfcheck" after a fallback).
_DENY: dict[str, str] = {}
_INSTALLED = False

SELECTION_PATCH = ledger.Patch(
    name="kernel-selection-capture",
    why="vLLM discards the reasons it turned kernel candidates down; the inventory and the "
    "fallback metric need them per layer, and --deny-kernel needs a hook in every chooser.",
    how="Rebind `is_supported_and_can_implement_kernel` and `choose_scaled_mm_linear_kernel` "
    "in vllm.model_executor.kernels.linear with wrappers that record each attempt and answer "
    "'denied' for denied classes; wrap `dispatch_cpu_unquantized_gemm` to name the CPU branch; "
    "rebind `backend_to_kernel_cls` in every vllm.model_executor.layers.fused_moe.oracle "
    "module so that each candidate class it returns has its `is_supported_config` staticmethod "
    "replaced (once, on the class) by a wrapper that calls vLLM's, records the answer per "
    "FusedMoEConfig and answers 'denied' for denied classes.",
    upstream="none: vLLM logs one 'Selected X for Y' line per kernel class (info_once).",
    remove_when="vLLM records the candidates it turned down on the kernel object.",
)


def selection_for_config(config: object) -> Selection | None:
    """The recorded choice that produced a kernel with this `.config`."""
    return _BY_CONFIG.get(id(config))


def selection_for_layer(layer: object) -> Selection | None:
    """The recorded CPU unquantized GEMM dispatch of `layer`."""
    return _BY_LAYER.get(id(layer))


def selection_for_moe_config(config: object) -> Selection | None:
    """The recorded MoE oracle choice for this `FusedMoEConfig`."""
    return _BY_MOE_CONFIG.get(id(config))


def forget_moe_selection(config: object) -> None:
    """Start this `FusedMoEConfig`'s record afresh: the self-check asks the oracle again, and
    what an earlier question (one that found no candidate) recorded is not this choice."""
    _BY_MOE_CONFIG.pop(id(config), None)


@contextmanager
def turned_down(reasons: dict[str, str]) -> Iterator[None]:
    """Deny these kernel classes (name → reason) while vLLM's chooser runs inside the block.

    The self-check re-asks vLLM's own chooser for a layer's next candidate this way.
    """
    saved = dict(_DENY)
    _DENY.update(reasons)
    try:
        yield
    finally:
        _DENY.clear()
        _DENY.update(saved)


def install(deny: tuple[str, ...] = ()) -> None:
    """Wrap vLLM's choosers once per process; later calls only update the deny list."""
    global _INSTALLED
    _DENY.clear()
    _DENY.update(dict.fromkeys(deny, DENIED))
    if _INSTALLED:
        return
    _INSTALLED = True
    module = vllm_adapter.linear_kernels_module()
    module.is_supported_and_can_implement_kernel = _wrap_check(
        module.is_supported_and_can_implement_kernel
    )
    module.choose_scaled_mm_linear_kernel = _wrap_choose(module.choose_scaled_mm_linear_kernel)
    utils = vllm_adapter.unquantized_cpu_dispatch_module()
    if hasattr(utils, "dispatch_cpu_unquantized_gemm"):
        utils.dispatch_cpu_unquantized_gemm = _wrap_cpu_dispatch(
            utils.dispatch_cpu_unquantized_gemm
        )
    elif vllm_adapter.is_cpu_build():
        ledger.record_missing(
            "kernel-selection-capture:cpu-dispatch", "vLLM's CPU build has no "
            "dispatch_cpu_unquantized_gemm where gemmguard looks: the kernel of unquantized "
            "layers on CPU (oneDNN or torch linear) is not named")
    from gemmguard.vllm_adapter import moe

    if not moe.check_moe_candidates(check_moe_candidate):
        ledger.record_missing(
            "kernel-selection-capture:moe", "vLLM has no MoE oracle module where gemmguard "
            "looks (fused_moe.oracle): MoE experts' turned-down candidates are not recorded "
            "and --deny-kernel does not reach experts classes")
    ledger.record(SELECTION_PATCH)


def check_moe_candidate(kernel: type, moe_config: object,
                        ask: Callable[[], tuple[bool, str | None]]) -> tuple[bool, str | None]:
    """Answer an MoE oracle's support question ('denied', else vLLM's) and record it."""
    reason: str | None
    if kernel.__name__ in _DENY:
        ok, reason = False, _DENY[kernel.__name__]
    else:
        ok, reason = ask()
    selection = _BY_MOE_CONFIG.get(id(moe_config))
    # vLLM's oracles stop at the first supported class: a question after it is a new choice.
    if selection is None or any(a.accepted for a in selection.attempts):
        selection = _BY_MOE_CONFIG[id(moe_config)] = Selection()
    selection.attempts.append(Attempt(kernel.__name__, bool(ok), str(reason or "").strip()))
    return ok, reason


def _wrap_check(original: Any) -> Any:
    @functools.wraps(original)
    def check(kernel: type, config: Any, compute_capability: int | None) -> tuple[bool, str]:
        if kernel.__name__ in _DENY:
            ok, reason = False, _DENY[kernel.__name__]
        else:
            ok, reason = original(kernel, config, compute_capability)
        if _ACTIVE:
            _ACTIVE[-1].attempts.append(Attempt(kernel.__name__, ok, str(reason).strip()))
        return ok, reason

    check.__gemmguard_wrapped__ = original  # type: ignore[attr-defined]  # a function attribute
    return check


def _wrap_choose(original: Any) -> Any:
    @functools.wraps(original)
    def choose(config: Any, *args: Any, **kwargs: Any) -> Any:
        selection = Selection()
        _ACTIVE.append(selection)
        try:
            chosen = original(config, *args, **kwargs)
        finally:
            _ACTIVE.pop()
        # A forced kernel is checked first; keep only the attempts up to the chosen one.
        _BY_CONFIG[id(config)] = selection
        if not any(a.accepted and a.kernel == chosen.__name__ for a in selection.attempts):
            selection.attempts.append(Attempt(chosen.__name__, True))
        return chosen

    choose.__gemmguard_wrapped__ = original  # type: ignore[attr-defined]  # a function attribute
    return choose


def cpu_gemm_name(fn: Any) -> str:
    """Name the function a CPU layer's `cpu_linear` calls (vLLM stores a lambda)."""
    code: types.CodeType | None = getattr(fn, "__code__", None)
    if code is None:
        return getattr(fn, "__qualname__", type(fn).__name__)
    names = code.co_names
    if "onednn_mm" in names:
        return "onednn_mm"
    if "weight_packed_linear_cpu" in names:
        return "weight_packed_linear_cpu"
    if any(n.startswith("zentorch") for n in names):
        return next(n for n in names if n.startswith("zentorch"))
    if "linear" in names:
        return "torch.nn.functional.linear"
    return code.co_name


def _wrap_cpu_dispatch(original: Any) -> Any:
    @functools.wraps(original)
    def dispatch(layer: Any, *args: Any, **kwargs: Any) -> Any:
        selection = Selection()
        ops = vllm_adapter.custom_ops()
        create: Any = getattr(ops, "create_onednn_mm", None)

        def watched_create(*c_args: Any, **c_kwargs: Any) -> Any:
            # vLLM catches this failure and falls back to F.linear, logging it only once.
            try:
                return create(*c_args, **c_kwargs)
            except RuntimeError as exc:
                selection.attempts.append(Attempt("onednn_mm", False, str(exc).strip()))
                raise

        if create is not None:
            ops.create_onednn_mm = watched_create
        try:
            result = original(layer, *args, **kwargs)
        finally:
            if create is not None:
                ops.create_onednn_mm = create
        chosen = cpu_gemm_name(layer_view.cpu_linear(layer))
        selection.attempts.append(Attempt(chosen, True))
        _BY_LAYER[id(layer)] = selection
        return result

    dispatch.__gemmguard_wrapped__ = original  # type: ignore[attr-defined]  # a function attribute
    return dispatch
