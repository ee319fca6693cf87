"""Run each layer's own kernel on seeded activations and measure it in bits against references.

bits = -log2(‖y_kernel − y_exact‖ / ‖y_exact‖), the worst over token counts (kernels branch
on M); expected_bits likewise for the scheme's ideal; excess_bits = expected − bits.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from gemmguard.inventory.report import _kernel_name, _kernel_of
from gemmguard.selfcheck import reference
from gemmguard.selfcheck.sample import ROW_BLOCK, LayerSample

TOKEN_COUNTS = (1, 16, 128)
OUTLIER_CHANNELS = 4
OUTLIER_GAIN = 20.0
# Verdict thresholds (DESIGN.md): E8M0 scales cost ~0.5 bit; a race garbles whole blocks.
DEGRADED_EXCESS_BITS = 0.25
BROKEN_RELATIVE_ERROR = 0.25


def activations(tokens: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Seeded normal activations with a few large channels, as real hidden states have."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + tokens * 7919 + k)
    x = torch.randn(tokens, k, generator=gen)
    channels = torch.randperm(k, generator=gen)[:OUTLIER_CHANNELS]
    x[:, channels] *= OUTLIER_GAIN
    return x.to(dtype)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return math.inf
    denom = ref.norm().item()
    return (y - ref).norm().item() / denom if denom > 0 else math.inf


def to_bits(error: float) -> float:
    if error == 0:
        return 24.0  # fp32 agreement: as many bits as there are
    return -math.log2(error) if math.isfinite(error) else -math.inf


@dataclass
class LayerResult:
    """One layer's measurement and verdict."""

    layer: str
    kernel: str
    scheme: str
    bits: float
    expected_bits: float
    excess_bits: float
    worst_block_error: float
    tokens_at_worst: int
    verdict: str

    def as_dict(self) -> dict[str, Any]:
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                for k, v in asdict(self).items()}


def verdict(bits: float, excess: float, worst_block_error: float,
            degraded_excess: float = DEGRADED_EXCESS_BITS) -> str:
    """pass, degraded (loses more than `degraded_excess` bit), or broken."""
    if not math.isfinite(bits) or worst_block_error >= BROKEN_RELATIVE_ERROR or \
            bits <= -math.log2(BROKEN_RELATIVE_ERROR):
        return "broken"
    if excess > degraded_excess:
        return "degraded"
    return "pass"


def _block_sums(y: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per 128-row block: [sum of squared error, sum of squared reference] (non-finite → inf)."""
    blocks = rows.div(ROW_BLOCK, rounding_mode="floor")
    n_blocks = int(blocks.max()) + 1
    diff = torch.nan_to_num((y - ref).pow(2).sum(dim=0), nan=math.inf)
    sums = torch.zeros(2, n_blocks, dtype=torch.float64)
    sums[0].index_add_(0, blocks, diff.double())
    sums[1].index_add_(0, blocks, ref.pow(2).sum(dim=0).double())
    return sums


def _device(module: Any) -> torch.device:
    """Where the layer computes: its parameters' device (the host for parameter-less fakes)."""
    parameters = getattr(module, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return first.device if first is not None else torch.device("cpu")


@torch.inference_mode()
def check_layer(module: Any, sample: LayerSample, seed: int = 0) -> LayerResult:
    """Run the layer's own `apply` (the kernel vLLM chose) and measure it."""
    method = module.quant_method
    kernel = _kernel_of(getattr(module, "scheme", None)) or _kernel_of(method)
    if kernel is not None:
        kernel_name = _kernel_name(kernel)
    else:
        from gemmguard.inventory.report import _linear_row

        kernel_name = _linear_row(sample.layer, module, "linear")["kernel"]
    k = sample.weight.shape[1]
    device = _device(module)
    worst: tuple[float, float, float, int] | None = None
    block_sums = None
    for tokens in TOKEN_COUNTS:
        x = activations(tokens, k, sample.out_dtype, seed)
        y = method.apply(module, x.to(device)).float().cpu()[:, sample.rows]
        exact = reference.exact(sample, x)
        bits = to_bits(relative_error(y, exact))
        expected = to_bits(relative_error(reference.ideal(sample, x), exact))
        sums = _block_sums(y, exact, sample.rows)
        block_sums = sums if block_sums is None else block_sums + sums
        if worst is None or expected - bits > worst[2] or not math.isfinite(bits):
            worst = (bits, expected, expected - bits, tokens)
    assert worst is not None and block_sums is not None
    # Blocks are judged over all token counts together: one row per block is too few alone.
    worst_block = float((block_sums[0] / block_sums[1].clamp(min=1e-30)).sqrt().max())
    bits, expected, excess, tokens = worst
    return LayerResult(sample.layer, kernel_name, sample.scheme, round(bits, 3),
                       round(expected, 3), round(excess, 3), round(worst_block, 4), tokens,
                       verdict(bits, excess, worst_block))


def check_model(model: torch.nn.Module, samples: dict[str, LayerSample],
                seed: int = 0) -> tuple[list[LayerResult], float]:
    """Check every sampled layer; returns the results and the seconds it took."""
    start = time.perf_counter()
    modules = dict(model.named_modules())
    results = [check_layer(modules[name], sample, seed)
               for name, sample in samples.items() if name in modules]
    return results, time.perf_counter() - start
