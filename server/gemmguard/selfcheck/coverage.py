"""Reconciliation: every GEMM the loaded model holds has exactly one row in the self-check.

The check sees a layer only when vLLM's loader post-processes it through the walk that
`load_check` wraps. A loader with its own copy of that walk (GGUF's, the weight-cache loaders',
any future one) or a GEMM outside vLLM's layer classes (a plain `torch.nn.Linear`) would give
no row at all, and a report without rows would read as passed. So after load the model is
walked once more: each GEMM-owning module the check did not see gets an `unchecked` row that
says so, and the report counts what the model holds, what the check saw and what it checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gemmguard import vllm_adapter
from gemmguard.inventory import report
from gemmguard.selfcheck.measure import LayerResult, unchecked
from gemmguard.vllm_adapter import layer as vllm_layer

NOT_SEEN = "not seen by the check (loader {loader})"


@dataclass(frozen=True)
class Coverage:
    """GEMM-owning modules of one rank's model: held, seen by the check, checked by it."""

    held: int = 0
    seen: int = 0
    checked: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"modules_held": self.held, "modules_seen": self.seen,
                "modules_checked": self.checked}


def gemm_modules(model: torch.nn.Module) -> list[tuple[str, Any, str]]:
    """(name, module, layer type) of every module that owns a GEMM, in model order.

    Linear layers of any class (vLLM's, attention projections included, and plain torch ones),
    fused-MoE expert layers, and the output head, also where it is an embedding.
    """
    linear, lm_head = vllm_adapter.linear_base(), vllm_adapter.lm_head_class()
    moe = vllm_adapter.moe_layer_classes()
    head = getattr(model, "lm_head", None)
    found = []
    for name, module in model.named_modules():
        if isinstance(module, lm_head) or (module is head and hasattr(module, "weight")):
            found.append((name, module, "lm_head"))
        elif isinstance(module, (linear, torch.nn.Linear)):
            found.append((name, module, "linear"))
        elif moe and isinstance(module, moe):
            found.append((name, module, "moe"))
    return found


def _kernel_and_scheme(name: str, module: Any, layer_type: str) -> tuple[str, str]:
    """What the inventory says the module runs; a module outside vLLM's classes runs torch."""
    if vllm_layer.quant_method(module) is None:
        weight = getattr(module, "weight", None)
        scheme = report.scheme_of(None, weight if isinstance(weight, torch.Tensor) else None)
        return "torch.nn.functional.linear", scheme
    try:
        row = report.moe_row(name, module) if layer_type == "moe" else \
            report.linear_row(name, module, layer_type)
    except Exception as exc:  # the row must exist even where the inventory cannot read it
        return f"unknown ({type(exc).__name__})", "unknown"
    return str(row["kernel"]), str(row["scheme"])


def reconcile(layers: list[LayerResult], model: torch.nn.Module, loader: str) -> Coverage:
    """Add an `unchecked` row for every GEMM-owning module without one; count the rest.

    `layers` are the check's rows (by module name); `loader` names vLLM's load format, for
    the reason of a module the check never saw.
    """
    rows = {result.layer: result for result in layers}
    held = gemm_modules(model)
    seen = checked = 0
    for name, module, layer_type in held:
        result = rows.get(name)
        if result is not None:
            seen += 1
            checked += result.verdict != "unchecked"
            continue
        kernel, scheme = _kernel_and_scheme(name, module, layer_type)
        layers.append(unchecked(name, layer_type, kernel, scheme,
                                NOT_SEEN.format(loader=loader), seen=False))
    return Coverage(len(held), seen, checked)
