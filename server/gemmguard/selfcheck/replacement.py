"""Swap one layer's kernel in place: restore its checkpoint tensors, rebuild, post-process again.

Linear layers: kernels vLLM can rebuild from their config (the scaled-mm family: fp8 tensor,
channel and block, int8) are swappable; their holder keeps the instance under a known attribute.
MoE layers: the whole path (quant method, weight conversion, experts) is chosen again by vLLM's
oracle where the method can be rebuilt (`vllm_adapter.moe.rebuild_method`: unquantized, for now).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gemmguard import vllm_adapter
from gemmguard.inventory.selection import turned_down
from gemmguard.selfcheck.measure import TOKEN_COUNTS, activations, device_of
from gemmguard.vllm_adapter import layer


@dataclass
class KernelSlot:
    """Where a layer's kernel instance lives: `holder.<attr>`."""

    holder: Any
    attr: str

    @property
    def kernel(self) -> Any:
        return getattr(self.holder, self.attr)


def slot_of(module: Any) -> KernelSlot | None:
    """The layer's swappable kernel slot, or None when its kernel cannot be swapped in place."""
    found = layer.kernel_slot(module)
    if found is None or not layer.is_rebuildable(getattr(*found)):
        return None
    return KernelSlot(*found)


@dataclass
class KeptTensors:
    """A layer's parameters as loaded, before post-processing (objects and a copy of the data)."""

    params: dict[str, tuple[torch.nn.Parameter, torch.Tensor]]

    @classmethod
    def of(cls, module: torch.nn.Module) -> KeptTensors:
        return cls({name: (p, p.data.clone())
                    for name, p in module.named_parameters(recurse=False)})

    def restore(self, module: torch.nn.Module) -> None:
        for name, _ in list(module.named_parameters(recurse=False)):
            if name not in self.params:
                delattr(module, name)
        for name, (param, data) in self.params.items():
            param.data = data.clone()
            if name in module._parameters:
                module._parameters[name] = param
            else:
                if hasattr(module, name):
                    delattr(module, name)
                module.register_parameter(name, param)


def next_kernel(current: Any, reasons: dict[str, str]) -> Any | None:
    """vLLM's next choice for the same config with `reasons` turned down; None if none is left."""
    with turned_down(reasons):
        try:
            return vllm_adapter.rebuild_scaled_mm_kernel(current)
        except (ValueError, vllm_adapter.KernelNotRebuildable):
            return None


def install(module: Any, slot: KernelSlot, kernel: Any, kept: KeptTensors,
            post_process: Callable[[Any], None]) -> None:
    """Put `kernel` into the slot and post-process the layer's checkpoint tensors for it."""
    kept.restore(module)
    setattr(slot.holder, slot.attr, kernel)
    post_process(module)


@torch.inference_mode()
def seconds_per_call(module: Any, k: int, dtype: torch.dtype, repeats: int = 3) -> float:
    """The layer's own apply, timed at the check's token counts (median of a few, summed)."""
    device = device_of(module)
    total = 0.0
    for tokens in TOKEN_COUNTS:
        x = activations(tokens, k, dtype, 0).to(device)
        layer.apply_linear(module, x)  # warm-up (lazy set-up, JIT)
        times = []
        for _ in range(repeats):
            vllm_adapter.synchronize(device)
            start = time.perf_counter()
            layer.apply_linear(module, x)
            vllm_adapter.synchronize(device)
            times.append(time.perf_counter() - start)
        total += statistics.median(times)
    return total


@torch.inference_mode()
def moe_seconds_per_call(module: Any, sample: Any, repeats: int = 3) -> float:
    """The MoE layer's experts kernel with the check's routing, timed as `seconds_per_call`."""
    from gemmguard.selfcheck.measure import routing

    device = device_of(module)
    total = 0.0
    for tokens in TOKEN_COUNTS:
        x = activations(tokens, sample.hidden, sample.out_dtype, 0).to(device)
        weights, ids = (t.to(device) for t in routing(sample, tokens, 0))
        vllm_adapter.moe_apply(module, x, weights, ids)  # warm-up
        times = []
        for _ in range(repeats):
            vllm_adapter.synchronize(device)
            start = time.perf_counter()
            vllm_adapter.moe_apply(module, x, weights, ids)
            vllm_adapter.synchronize(device)
            times.append(time.perf_counter() - start)
        total += statistics.median(times)
    return total
