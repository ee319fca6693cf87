"""A small sample of one layer's checkpoint representation, taken before vLLM post-processes it.

Kernels re-lay-out or re-quantize weights in `process_weights_after_loading` (DeepGEMM's
power-of-two scales, Marlin repacking, AITER shuffles). A reference built from the weights
in memory afterwards would share the kernel's mistakes, so the sample is taken just before,
in fp32, on the host. It lives only until its layer is checked.

Linear layers: one output row per 128-row block (a kernel that corrupts one block is seen),
plus the rows in the blocks or groups with the smallest and largest scales.
MoE layers: a few experts, always those with the smallest and largest weight scales, each
with its whole gate/up weight (the down projection's input needs all of it) and at least 64
sampled rows of its down projection (one per 128-row block, and evenly spaced others).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gemmguard.selfcheck import schemes
from gemmguard.selfcheck.schemes import Activation
from gemmguard.vllm_adapter import layer

ROW_BLOCK = 128
# Experts sampled per MoE layer: the smallest- and largest-scale ones plus seeded others.
MOE_EXPERTS = 4
# Output rows of an MoE layer's down projection sampled, at least: an expert gets few tokens,
# and an excess measured on fewer values is noise (recorded on the H100: ±0.5 bit from seed to
# seed with the 2 rows of a 256-wide layer). Rows cost only len(rows)·I floats per expert.
MOE_ROWS = 64


@dataclass
class LinearSample:
    """Sampled rows of one linear layer's checkpoint weights, dequantized to fp32."""

    layer: str
    scheme: str
    rows: torch.Tensor  # indices of the sampled output rows
    weight: torch.Tensor  # fp32 (len(rows), K)
    activation: Activation
    out_dtype: torch.dtype

    def nbytes(self) -> int:
        return self.weight.numel() * 4 + self.rows.numel() * 8


@dataclass
class MoeSample:
    """A few experts of one MoE layer from the checkpoint, in fp32."""

    layer: str
    scheme: str
    experts: list[int]  # local expert indices, smallest- and largest-scale first
    global_ids: list[int]  # the ids routing uses for them
    num_experts: int  # global expert count (ids routing may use)
    top_k: int
    w13: dict[int, torch.Tensor]  # local expert → (2I, H)
    w2: dict[int, torch.Tensor]  # local expert → (len(rows), I)
    rows: torch.Tensor  # sampled rows of the down projection (output features)
    activation: Activation
    out_dtype: torch.dtype
    hidden: int = 0
    # local expert → (its w13 input, its w2 input) quantization, where experts differ (NVFP4)
    expert_activations: dict[int, tuple[Activation, Activation]] = field(default_factory=dict)
    # local expert → the fp32 global factor folded into its w2 values (NVFP4), where there is one
    w2_global_factor: dict[int, float] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * 4 for t in (*self.w13.values(), *self.w2.values()))


def sample_rows(n_rows: int) -> torch.Tensor:
    """One row per 128-row block, at a position that varies from block to block."""
    rows = []
    for block_start in range(0, n_rows, ROW_BLOCK):
        size = min(ROW_BLOCK, n_rows - block_start)
        rows.append(block_start + (block_start // ROW_BLOCK * 37 + 5) % size)
    return torch.tensor(rows, dtype=torch.long)


def spread_rows(n_rows: int, at_least: int) -> torch.Tensor:
    """One row per 128-row block, and evenly spaced others up to `at_least` rows in all."""
    if n_rows <= at_least:
        return torch.arange(n_rows)
    even = torch.linspace(0, n_rows - 1, at_least).round().long()
    rows: torch.Tensor = torch.unique(torch.cat([sample_rows(n_rows), even]))
    return rows


def _out_dtype(module: Any, weight: Any) -> torch.dtype:
    """The activation (and output) dtype the kernel runs with: vLLM's record of it, else a
    floating weight's dtype, else bf16 (a layer outside an engine)."""
    recorded = layer.activation_dtype(module)
    if recorded is not None:
        return recorded
    if isinstance(weight, torch.Tensor) and weight.dtype in (torch.bfloat16, torch.float16,
                                                             torch.float32):
        return weight.dtype
    return torch.bfloat16


def capture_linear(name: str, module: Any, kernel: Any, scheme: str) -> LinearSample:
    """Sample a linear layer's checkpoint rows; raises `schemes.Unchecked` with the reason."""
    fmt = schemes.linear_format(scheme, kernel)
    n_rows = fmt.n_rows(module)
    rows = torch.unique(torch.cat([sample_rows(n_rows),
                                   torch.tensor(fmt.extreme_rows(module), dtype=torch.long)]))
    weight = fmt.rows(module, rows)
    return LinearSample(name, scheme, rows, weight, fmt.activation(module, kernel),
                        _out_dtype(module, layer.tensor(module, "weight")))


def _local_to_global(module: Any, n_local: int) -> list[int]:
    """Global expert id of each local expert (expert parallelism maps a slice per rank)."""
    expert_map = layer.expert_map(module)
    if expert_map is None:
        return list(range(n_local))
    ids = [-1] * n_local
    for global_id, local in enumerate(expert_map.tolist()):
        if 0 <= local < n_local:
            ids[local] = global_id
    return ids


def choose_experts(magnitude: torch.Tensor, count: int, seed: int = 0) -> list[int]:
    """The smallest- and largest-scale experts first, then seeded others, `count` in all."""
    n = magnitude.numel()
    chosen = list(dict.fromkeys([int(magnitude.argmin()), int(magnitude.argmax())]))
    gen = torch.Generator().manual_seed(seed + 17)
    for expert in torch.randperm(n, generator=gen).tolist():
        if len(chosen) >= min(count, n):
            break
        if expert not in chosen:
            chosen.append(expert)
    return chosen


def capture_moe(name: str, module: Any, seed: int = 0) -> MoeSample:
    """Sample an MoE layer's experts from the checkpoint; raises `schemes.Unchecked`.

    Works from the format's view of the experts, so packed experts (4-bit words, fp4 bytes),
    whose tensors have no plain (E, 2I, H) shape, are sampled as well as unpacked ones.
    """
    scheme = schemes.moe_scheme(module)
    fmt = schemes.moe_format(scheme, module)
    magnitude = fmt.expert_magnitude(module)
    n_local = int(magnitude.numel())
    if n_local == 0:
        raise schemes.Unchecked("weights do not match the declared scheme: no experts")
    top_k = layer.moe_top_k(module)
    experts = choose_experts(magnitude, max(MOE_EXPERTS, top_k + 1), seed)
    global_ids = _local_to_global(module, n_local)
    hidden = _hidden_size(module)
    rows = spread_rows(hidden, MOE_ROWS)
    # NVFP4 experts carry a global input scale each: their activations are quantized by it.
    per_expert = getattr(fmt, "expert_activation", None)
    activations = {e: (per_expert(module, e, "w13"), per_expert(module, e, "w2"))
                   for e in experts} if callable(per_expert) else {}
    down_factor = getattr(fmt, "w2_global_factor", None)
    factors = {e: down_factor(module, e) for e in experts} if callable(down_factor) else {}
    w13 = layer.tensor(module, "w13_weight")
    floating = w13 is not None and w13.dtype.is_floating_point and w13.element_size() > 1
    return MoeSample(
        layer=name, scheme=scheme, experts=experts,
        global_ids=[global_ids[e] for e in experts],
        num_experts=layer.moe_global_experts(module) or n_local,
        top_k=top_k,
        w13={e: fmt.w13(module, e) for e in experts},
        w2={e: fmt.w2_rows(module, e, rows) for e in experts},
        rows=rows, activation=fmt.activation(module),
        out_dtype=_out_dtype(module, w13 if floating else None),
        hidden=hidden, expert_activations=activations,
        w2_global_factor={e: f for e, f in factors.items() if f is not None},
    )


def _hidden_size(module: Any) -> int:
    """The layer's hidden size (the down projection's output rows)."""
    hidden = layer.moe_hidden_size(module)
    if hidden is not None:
        return hidden
    w2 = layer.tensor(module, "w2_weight")
    if w2 is not None and w2.dim() == 3:
        return int(w2.shape[1])
    raise schemes.Unchecked("weights do not match the declared scheme: no hidden_size and no "
                            "3-D w2_weight")
