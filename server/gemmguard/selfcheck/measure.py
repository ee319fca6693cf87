"""Run a layer's own kernel on seeded activations and measure it in bits against references.

bits = -log2(‖y_kernel − y_exact‖ / ‖y_exact‖), the worst over token counts (kernels branch
on M); expected_bits likewise for the scheme's ideal; excess_bits = expected − bits.
Activations are made on the host with a seeded generator, outside any compiled graph.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gemmguard import vllm_adapter
from gemmguard.selfcheck import reference
from gemmguard.selfcheck.sample import ROW_BLOCK, LinearSample, MoeSample
from gemmguard.vllm_adapter import layer as vllm_layer

TOKEN_COUNTS = (1, 16, 128)
OUTLIER_CHANNELS = 4
OUTLIER_GAIN = 20.0
# Degraded above this many bits beyond the scheme's ideal: the middle of the margin between
# honest and faulty kernels' recorded outputs (selfcheck.calibration, docs/calibration.md).
CALIBRATION = json.loads(Path(__file__).with_name("calibration.json").read_text())
DEGRADED_EXCESS_BITS: float = CALIBRATION["degraded_excess_bits"]
# Broken at 25 % relative error (in any 128-row block): a race garbles whole blocks.
BROKEN_RELATIVE_ERROR = 0.25
# Outputs an excess is measured on, at least: on fewer, seed-to-seed noise reaches the
# threshold (the relative error of n values varies by about 1/(ln 2·√(2n)) bit).
MIN_VALUES = 256
# Tokens an expert must get for its own excess to be judged: a per-token step (the activation
# scale) makes tokens, not values, the independent draws (recorded on the H100: an fp8 expert
# given 18 tokens read 0.39 bit on one seed of five, ~0 on the others).
MIN_EXPERT_TOKENS = 32
VERDICTS = ("pass", "degraded", "broken", "unchecked")
FAILING = ("degraded", "broken")


# Layers of one shape recur (an 8B model: 4 shapes, 32 times each): their activations are made
# once per (tokens, k, dtype, seed) and copied, not drawn again for every layer (~5–16 ms of host
# time per layer at K 4096–14336). 3 token counts × a few shapes; `forget_activations` frees them.
_ACTIVATIONS_KEPT = 16


@functools.lru_cache(maxsize=_ACTIVATIONS_KEPT)
def _drawn(tokens: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + tokens * 7919 + k)
    x = torch.randn(tokens, k, generator=gen, dtype=torch.float32)
    channels = torch.randperm(k, generator=gen)[:OUTLIER_CHANNELS]
    x[:, channels] *= OUTLIER_GAIN
    return x.to(dtype)


def activations(tokens: int, k: int, dtype: torch.dtype, seed: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Seeded normal activations with a few large channels, as real hidden states have: a
    tensor of the caller's own on `device` (a kernel that writes into its input harms no one)."""
    drawn = _drawn(tokens, k, dtype, seed)
    return drawn.to(device, copy=True)


def forget_activations() -> None:
    """Free the kept activations (the check is over)."""
    _drawn.cache_clear()


class NoReference(ValueError):
    """The checkpoint gives no usable reference for this layer (the reason says why)."""


# Why a layer whose reference is undefined (scales or weights hold inf/NaN, or it is zero) and
# whose output is zero too is left unchecked: neither side says anything.
NON_FINITE_REFERENCE = (
    "the reference built from the checkpoint is not finite: its weights or scales for this "
    "layer hold inf/NaN (weights that do not match the declared scheme, e.g. a layer the "
    "checkpoint stores unquantized but its quantization config does not exclude)")
NON_FINITE_OUTPUT = "the kernel's output holds inf/NaN"
# A layer that computes finite, non-zero values where the checkpoint defines none (measured on
# the H200: a bf16 router under an FP8 config that does not exclude it) serves garbage.
UNDEFINED_BY_CHECKPOINT = (
    "the layer computes values the checkpoint does not define: its reference is {what} while "
    "the kernel's output is finite and non-zero (weights that do not match the declared "
    "scheme, e.g. a layer stored unquantized that the quantization config does not exclude)")


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """‖y − ref‖ / ‖ref‖; inf for non-finite output; nan when the reference is zero."""
    if not torch.isfinite(y).all():
        return math.inf
    denom = ref.norm().item()
    return (y - ref).norm().item() / denom if denom > 0 else math.nan


def to_bits(error: float) -> float:
    if error == 0:
        return 24.0  # fp32 agreement: as many bits as there are
    return -math.log2(error) if math.isfinite(error) else -math.inf


def _finite(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None


@dataclass
class LayerResult:
    """One layer's measurement and verdict. Non-finite numbers are reported as None."""

    layer: str
    layer_type: str
    kernel: str
    scheme: str
    verdict: str
    bits: float | None = None
    expected_bits: float | None = None
    excess_bits: float | None = None
    worst_block_error: float | None = None
    tokens_at_worst: int = 0
    reason: str = ""
    experts: list[dict[str, Any]] = field(default_factory=list)
    replacement: dict[str, Any] | None = None
    # False: the check never saw the layer (its loader bypassed the check; selfcheck.coverage).
    seen: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def unchecked(layer: str, layer_type: str, kernel: str, scheme: str, reason: str,
              seen: bool = True) -> LayerResult:
    return LayerResult(layer, layer_type, kernel, scheme, "unchecked", reason=reason, seen=seen)


def verdict(bits: float, excess: float, worst_block_error: float,
            degraded_excess: float = DEGRADED_EXCESS_BITS, enough_values: bool = True) -> str:
    """pass, degraded (loses more than `degraded_excess` bit), or broken.

    Broken: inf/NaN, a 128-row block ≥ 25 % wrong, or ≥ 25 % error overall beyond what the
    scheme allows (an input the scheme itself quantizes that coarsely is not the kernel's
    fault). `enough_values` False: too few outputs to tell a fraction of a bit, so only broken.
    """
    beyond_scheme = excess > degraded_excess
    if not math.isfinite(bits) or not math.isfinite(worst_block_error) or \
            worst_block_error >= BROKEN_RELATIVE_ERROR or \
            (bits <= -math.log2(BROKEN_RELATIVE_ERROR) and beyond_scheme):
        return "broken"
    if beyond_scheme and enough_values:
        return "degraded"
    return "pass"


# The head of `figures`: what one token count's output is judged on, before the block sums.
_Y_FINITE, _EXACT_FINITE, _EXACT_NORM, _Y_ABSMAX, _ERR, _IDEAL_ERR, _REF = range(7)
_HEAD = 7


def figures(y: torch.Tensor, exact: torch.Tensor, ideal: torch.Tensor,
            rows: torch.Tensor) -> torch.Tensor:
    """One token count's figures as one float64 vector, computed where `y` lies.

    The head (`_Y_FINITE` … `_REF`), then per 128-row block the sum of squared error and of
    squared reference (non-finite error → inf). Read back to the host once for every token
    count of a layer (`_compare`): each `.item()` would be a device sync of its own.
    """
    blocks = rows.div(ROW_BLOCK, rounding_mode="floor")
    n_blocks = int(blocks.max()) + 1  # `rows` lives on the host: no sync
    blocks = blocks.to(y.device)
    head = torch.stack([t.double() for t in (
        torch.isfinite(y).all(), torch.isfinite(exact).all(), exact.norm(),
        y.abs().max() if y.numel() else y.new_zeros(()),
        (y - exact).pow(2).sum(), (ideal - exact).pow(2).sum(), exact.pow(2).sum(),
    )])
    diff = torch.nan_to_num((y - exact).pow(2).sum(dim=0), nan=math.inf)
    sums = torch.zeros(2, n_blocks, dtype=torch.float64, device=y.device)
    sums[0].index_add_(0, blocks, diff.double())
    sums[1].index_add_(0, blocks, exact.pow(2).sum(dim=0).double())
    return torch.cat([head, sums.flatten()])


def device_of(module: Any) -> torch.device:
    """Where the layer computes: its parameters' device (the host for parameter-less fakes)."""
    parameters = getattr(module, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return first.device if first is not None else torch.device("cpu")


class _Worst:
    """The worst token count seen, judged on enough values, and block errors over all of them.

    A relative error measured on a few values is noise (two sampled rows of one token vary by
    a bit from seed to seed), so token counts are pooled, smallest first, until each group
    holds at least MIN_VALUES outputs; a short remainder joins the group before it.
    """

    def __init__(self) -> None:
        self.block_sums: torch.Tensor | None = None
        self.undefined = ""  # why the output is broken although no reference exists
        self.non_finite_tokens = 0  # a token count whose output held inf/NaN
        # per token count: [squared error, squared ideal error, squared reference, values, tokens]
        self.counts: list[tuple[float, float, float, int, int]] = []

    def add(self, y: torch.Tensor, exact: torch.Tensor, ideal: torch.Tensor,
            rows: torch.Tensor, tokens: int) -> None:
        self.add_figures(figures(y, exact, ideal, rows).cpu(), y.numel(), tokens)

    def add_figures(self, figs: torch.Tensor, values: int, tokens: int) -> None:
        """One token count's `figures` (on the host), of an output of `values` values."""
        # The kernel's output is judged first: inf/NaN is broken whatever the reference is.
        if not figs[_Y_FINITE]:
            self.non_finite_tokens = self.non_finite_tokens or tokens
            return
        undefined = ("not finite" if not figs[_EXACT_FINITE]
                     else "zero" if float(figs[_EXACT_NORM]) == 0 else None)
        if undefined is not None:
            if float(figs[_Y_ABSMAX]) > 0:
                self.undefined = UNDEFINED_BY_CHECKPOINT.format(what=undefined)
                return
            raise NoReference(NON_FINITE_REFERENCE if undefined == "not finite"
                              else "reference is zero")
        sums = figs[_HEAD:].view(2, -1)
        self.block_sums = sums if self.block_sums is None else self.block_sums + sums
        self.counts.append((float(figs[_ERR]), float(figs[_IDEAL_ERR]), float(figs[_REF]),
                            values, tokens))

    def _groups(self) -> list[tuple[float, float, float, int, int]]:
        groups: list[list[float]] = []
        open_group: list[float] | None = None
        for err, ideal_err, ref, values, tokens in self.counts:
            if open_group is None:
                open_group = [0.0, 0.0, 0.0, 0, 0]
                groups.append(open_group)
            for i, value in enumerate((err, ideal_err, ref, values)):
                open_group[i] += value
            open_group[4] = tokens
            if open_group[3] >= MIN_VALUES:
                open_group = None
        if len(groups) > 1 and groups[-1][3] < MIN_VALUES:
            last = groups.pop()
            groups[-1] = [a + b for a, b in zip(groups[-1][:4], last[:4], strict=True)] + \
                [last[4]]
        return [(g[0], g[1], g[2], int(g[3]), int(g[4])) for g in groups]

    def result(self, layer: str, layer_type: str, kernel: str, scheme: str) -> LayerResult:
        if self.non_finite_tokens:
            return LayerResult(layer, layer_type, kernel, scheme, "broken",
                               tokens_at_worst=self.non_finite_tokens, reason=NON_FINITE_OUTPUT)
        if self.undefined:
            return LayerResult(layer, layer_type, kernel, scheme, "broken",
                               reason=self.undefined)
        assert self.block_sums is not None
        bits, expected, excess, tokens = math.inf, math.inf, -math.inf, 0
        for err, ideal_err, ref, _, group_tokens in self._groups():
            group_bits = to_bits(math.sqrt(err / ref))
            group_expected = to_bits(math.sqrt(ideal_err / ref))
            if group_expected - group_bits > excess:
                bits, expected, excess, tokens = \
                    group_bits, group_expected, group_expected - group_bits, group_tokens
        # Blocks are judged over all token counts together: one row per block is too few alone.
        worst_block = float((self.block_sums[0] / self.block_sums[1].clamp(min=1e-30))
                            .sqrt().max())
        return LayerResult(layer, layer_type, kernel, scheme,
                           verdict(bits, excess, worst_block),
                           _finite(bits), _finite(expected), _finite(excess),
                           _finite(worst_block), tokens)


def add_phase(phases: dict[str, float] | None, name: str, since: float) -> float:
    """Add the seconds since `since` to `phases[name]` (when timing is asked for)."""
    now = time.perf_counter()
    if phases is not None:
        phases[name] = phases.get(name, 0.0) + now - since
    return now


def run_linear(module: Any, sample: LinearSample, seed: int = 0,
               phases: dict[str, float] | None = None,
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The layer's own `apply` (the kernel vLLM chose) at every token count.

    Returns the activations on the layer's device and the sampled output columns in fp32.
    `phases` gets the seconds spent in the kernel (with the copy back).
    """
    start = time.perf_counter()
    k = sample.weight.shape[1]
    device = device_of(module)
    xs = [activations(tokens, k, sample.out_dtype, seed, device) for tokens in TOKEN_COUNTS]
    rows = sample.rows.to(device)
    outs = [vllm_layer.apply_linear(module, x)[:, rows].float() for x in xs]
    if phases is not None:
        vllm_adapter.synchronize(device)  # so that "kernel" is the kernel's time
    add_phase(phases, "kernel", start)
    return xs, outs


def judge_linear(sample: LinearSample, xs: list[torch.Tensor], ys: list[torch.Tensor],
                 kernel: str, layer_type: str = "linear",
                 phases: dict[str, float] | None = None) -> LayerResult:
    """The verdict on a linear layer's outputs `ys` for the activations `xs` (one per token
    count), against the references built from its sample, computed where `ys` lie."""
    start = time.perf_counter()
    worst = _Worst()
    try:
        _compare(worst, sample, xs, ys, ys[0].device)
    except NoReference as exc:
        return unchecked(sample.layer, layer_type, kernel, sample.scheme, str(exc))
    finally:
        add_phase(phases, "reference", start)
    return worst.result(sample.layer, layer_type, kernel, sample.scheme)


@torch.inference_mode()
def check_linear(module: Any, sample: LinearSample, kernel: str, layer_type: str = "linear",
                 seed: int = 0, phases: dict[str, float] | None = None) -> LayerResult:
    """Run the layer's own kernel at every token count and measure it (see `judge_linear`)."""
    xs, outs = run_linear(module, sample, seed, phases)
    return judge_linear(sample, xs, outs, kernel, layer_type, phases)


def _compare(worst: _Worst, sample: LinearSample, xs: list[torch.Tensor],
             ys: list[torch.Tensor], device: torch.device) -> None:
    """Add each token count's output against the references to `worst`.

    The references are computed where the layer runs: an 8B model's samples are ~60 M fp32
    weights, 36 GFLOP of reference products over the three token counts, which a GPU does in
    milliseconds and a host (with vLLM's thread settings) does not. fp32 products there are full
    fp32 ("highest" precision: no TF32), whatever vLLM was told. A format whose reference
    cannot run on the device is computed on the host, as before.
    """
    try:
        on_device = dataclasses.replace(sample, weight=sample.weight.to(device))
        with reference.exact_fp32():
            pairs = [(reference.exact(on_device, x), reference.ideal(on_device, x)) for x in xs]
    except RuntimeError:  # e.g. a host-only tensor in a format's activation quantization
        if device.type == "cpu":
            raise
        xs, ys = [x.cpu() for x in xs], [y.cpu() for y in ys]
        pairs = [(reference.exact(sample, x), reference.ideal(sample, x)) for x in xs]
    # Every token count's figures come back to the host together: one device sync per layer.
    figs = torch.stack([figures(y, exact, ideal, sample.rows)
                        for y, (exact, ideal) in zip(ys, pairs, strict=True)]).cpu()
    for x, y, row in zip(xs, ys, figs, strict=True):
        worst.add_figures(row, y.numel(), x.shape[0])


def routing(sample: MoeSample, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded top-k routing over the sampled experts.

    Each token's first slot is a sampled expert with a weight in [0.5, 1] (exact in bf16); the
    other slots go to distinct experts with weight 0, so every token's output is one known
    expert's. The first sampled expert gets exactly one token, the second the most.
    """
    gen = torch.Generator().manual_seed(seed * 7907 + tokens)
    n = len(sample.experts)
    if tokens == 1:
        primary = torch.tensor([int(torch.randint(n, (1,), generator=gen))])
    else:
        primary = torch.randint(1, n, (tokens,), generator=gen)
        primary[: tokens // 2] = 1 % n  # the second sampled expert takes half the tokens
        primary[-1] = 0  # the first (smallest-scale) expert takes exactly one
    ids = torch.empty(tokens, sample.top_k, dtype=torch.long)
    ids[:, 0] = torch.tensor(sample.global_ids)[primary]
    for token in range(tokens):
        others = [e for e in range(sample.num_experts) if e != int(ids[token, 0])]
        pick = torch.randperm(len(others), generator=gen)[: sample.top_k - 1]
        ids[token, 1:] = torch.tensor(others)[pick]
    weights = torch.zeros(tokens, sample.top_k, dtype=torch.float32)
    # bf16 values: kernels that round the routing weight to the activation dtype before they
    # apply it (Marlin MoE's epilogue, docs/kernel-arithmetic.md) then compute what the others do.
    weights[:, 0] = (0.5 + 0.5 * torch.rand(tokens, generator=gen, dtype=torch.float32)
                     ).to(torch.bfloat16).float()
    return weights, ids


def moe_rounding(module: Any) -> reference.MoeRounding:
    """Where the layer's experts kernel family rounds (see `reference.MoeRounding`)."""
    from gemmguard.vllm_adapter import moe

    experts = moe.experts_of(module)
    if experts is not None and moe.is_cpu_unquantized_experts(experts):
        return reference.cpu_grouped(moe.cpu_bf16_conversion())
    return reference.rounding_of(type(experts).__name__) if experts is not None \
        else reference.STAGED


_SEVERITY = {"pass": 0, "degraded": 1, "broken": 2}


@dataclass
class MoeRun:
    """One token count through an MoE layer: activations, the check's routing, sampled output."""

    x: torch.Tensor  # host, the layer's dtype
    weights: torch.Tensor  # host fp32 (tokens, top_k)
    ids: torch.Tensor  # host int64 (tokens, top_k)
    y: torch.Tensor  # host fp32 (tokens, len(sample.rows))


def run_moe(module: Any, sample: MoeSample, seed: int = 0,
            phases: dict[str, float] | None = None) -> list[MoeRun]:
    """The layer's experts kernel at every token count, with routing fixed by the check."""
    device = device_of(module)
    rows = sample.rows.to(device)
    runs = []
    for tokens in TOKEN_COUNTS:
        start = time.perf_counter()
        x = activations(tokens, sample.hidden, sample.out_dtype, seed)
        weights, ids = routing(sample, tokens, seed)
        out = vllm_adapter.moe_apply(module, x.to(device), weights.to(device), ids.to(device))
        runs.append(MoeRun(x, weights, ids, out[:, rows].float().cpu()))
        add_phase(phases, "kernel", start)
    return runs


@torch.inference_mode()
def check_moe(module: Any, sample: MoeSample, kernel: str, seed: int = 0,
              phases: dict[str, float] | None = None) -> LayerResult:
    """Run the layer's experts kernel with routing fixed by the check (see `judge_moe`)."""
    rounding = moe_rounding(module)
    return judge_moe(sample, run_moe(module, sample, seed, phases), kernel, rounding, phases)


def judge_moe(sample: MoeSample, runs: list[MoeRun], kernel: str,
              rounding: reference.MoeRounding = reference.STAGED,
              phases: dict[str, float] | None = None) -> LayerResult:
    """The verdict on an MoE layer's outputs against fp32 references, where its experts kernel
    family rounds as `rounding` says.

    Each sampled expert gets its own verdict (its tokens only): an expert that gets one token
    of 128, or whose outputs are small, is judged on its own, not diluted in the layer's sum.
    The layer's verdict is the worst of its own and its experts'.
    """
    worst = _Worst()
    # expert → [squared error, squared ideal error, squared reference, values, tokens]
    per_expert: dict[int, list[float]] = {e: [0.0] * 5 for e in sample.experts}
    try:
        for run in runs:
            start = time.perf_counter()
            x, weights, ids, y = run.x, run.weights, run.ids, run.y
            exact = reference.moe_exact(sample, x, weights, ids)
            ideal = reference.moe_ideal(sample, x, weights, ids, rounding)
            add_phase(phases, "reference", start)
            worst.add(y, exact, ideal, sample.rows, x.shape[0])
            for expert, global_id in zip(sample.experts, sample.global_ids, strict=True):
                mine = ids[:, 0] == global_id
                if mine.any():
                    acc = per_expert[expert]
                    acc[0] += float(torch.nan_to_num((y[mine] - exact[mine]).pow(2),
                                                     nan=math.inf).sum())
                    acc[1] += float((ideal[mine] - exact[mine]).pow(2).sum())
                    acc[2] += float(exact[mine].pow(2).sum())
                    acc[3] += y[mine].numel()
                    acc[4] += int(mine.sum())
    except NoReference as exc:
        return unchecked(sample.layer, "moe", kernel, sample.scheme, str(exc))
    result = worst.result(sample.layer, "moe", kernel, sample.scheme)
    for expert, global_id in zip(sample.experts, sample.global_ids, strict=True):
        err, ideal_err, ref, values, tokens = per_expert[expert]
        if ref > 0:
            error = math.sqrt(err / ref)
            bits = to_bits(error)
            expected = to_bits(math.sqrt(ideal_err / ref))
            # An expert given few tokens is judged for broken only; the layer's pooled verdict
            # covers a fraction of a bit.
            judged = values >= MIN_VALUES and tokens >= MIN_EXPERT_TOKENS
            expert_verdict = verdict(bits, expected - bits, error, enough_values=judged)
            result.experts.append({"expert": global_id, "verdict": expert_verdict,
                                   "bits": _finite(bits), "expected_bits": _finite(expected),
                                   "excess_bits": _finite(expected - bits),
                                   "tokens": int(tokens), "excess_judged": judged})
            if _SEVERITY[expert_verdict] > _SEVERITY[result.verdict]:
                result.verdict = expert_verdict
    return result
