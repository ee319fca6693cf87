"""Reference GEMMs in fp32: the exact product and the scheme's own ideal.

`exact`  — activations as given, weights as the checkpoint defines them (fp32).
`ideal`  — activations quantized exactly as the scheme prescribes (fp32 scales), weights as
           the scheme multiplies them, the product accumulated in fp32 and rounded to the
           layer's output dtype: the best any honest kernel of the scheme can do. A kernel far
           below it is losing accuracy of its own. An A16 scheme (16-bit activations) multiplies
           16-bit weights at the MMA: a tensor core takes both operands in one dtype, so every
           such kernel (Marlin, Machete, exllama, Marlin MoE) dequantizes to bf16(q·s) first
           (docs/kernel-arithmetic.md). That rounding is the scheme's, so the ideal has it.
           A rounding the scheme does not prescribe (E8M0 re-quantized FP8 block scales) is a
           loss and stays out of it.
MoE layers: the same for each token's experts, SiLU-gated, weighted by the routing. An honest
fused-MoE kernel rounds to the output dtype at points its family defines (`MoeRounding`); the
ideal rounds at those points, so what it allows is the arithmetic of that family.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gemmguard import numerics
from gemmguard.selfcheck.sample import LinearSample, MoeSample
from gemmguard.selfcheck.schemes import Activation

INT8_MAX = 127.0


def _fake_quant_fp8(x: torch.Tensor, activation: Activation) -> torch.Tensor:
    if activation.kind == "group":
        return numerics.fake_quantize_fp8_groups(x, activation.size)
    if activation.kind == "token":
        scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / numerics.FP8_MAX
    elif activation.kind == "tensor":
        scale = x.abs().amax().clamp(min=1e-12) / numerics.FP8_MAX
    else:  # static
        scale = torch.tensor(activation.static_scale, dtype=torch.float32)
    q = (x / scale).clamp(-numerics.FP8_MAX, numerics.FP8_MAX).to(numerics.FP8_DTYPE)
    return q.float() * scale


def _fake_quant_int8(x: torch.Tensor, activation: Activation) -> torch.Tensor:
    if activation.kind == "static":
        scale = torch.tensor(activation.static_scale, dtype=torch.float32)
    elif activation.kind == "tensor":
        scale = x.abs().amax().clamp(min=1e-12) / INT8_MAX
    else:
        scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / INT8_MAX
    return (x / scale).round().clamp(-INT8_MAX, INT8_MAX) * scale


def quantize_activations(x: torch.Tensor, activation: Activation) -> torch.Tensor:
    """`x` in fp32 after the round trip the scheme prescribes for activations."""
    xf = x.float()
    if activation.kind == "none":
        return xf
    if activation.fmt == "fp8":
        return _fake_quant_fp8(xf, activation)
    if activation.fmt == "int8":
        return _fake_quant_int8(xf, activation)
    return numerics.fake_quantize_activation(xf, activation)


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 matrix products in full fp32 (no TF32 or bf16 passes) inside, as vLLM set after."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def exact(sample: LinearSample, x: torch.Tensor) -> torch.Tensor:
    """fp32 product of the activations with the checkpoint's sampled rows."""
    return x.float() @ sample.weight.t()


def weights_at_mma(weight: torch.Tensor, activation: Activation,
                   dtype: torch.dtype) -> torch.Tensor:
    """fp32 weights as the scheme's MMA sees them: rounded to `dtype` when activations stay in it.

    A16 (no activation quantization): the 16-bit activation dtype, bf16(q·s) rounded to nearest.
    Otherwise the weights meet quantized activations as the checkpoint stores them.
    """
    if activation.kind == "none" and dtype.itemsize == 2:
        return weight.to(dtype).float()
    return weight


def ideal(sample: LinearSample, x: torch.Tensor) -> torch.Tensor:
    """What the scheme allows: quantized activations, the scheme's weights at the MMA, fp32
    accumulation, output in its dtype."""
    weight = weights_at_mma(sample.weight, sample.activation, sample.out_dtype)
    out = quantize_activations(x, sample.activation) @ weight.t()
    return out.to(sample.out_dtype).float()


@dataclass(frozen=True)
class MoeRounding:
    """Where an honest fused-MoE kernel stores values in the output dtype, and how it converts.

    points: among "h" (the gate/up product), "gate" (the activation's output), "inter" (the
    gated intermediate, the down projection's input) and "down" (each expert's output before
    the weighted sum); the summed output is always converted. mode: "nearest" (IEEE round to
    nearest even) or "truncate" (round toward zero: the low mantissa bits are dropped).
    """

    points: frozenset[str]
    mode: str = "nearest"
    # How the router weight meets each expert's down output: "fp32" (multiplied in fp32 after
    # the stored output) or "bf16-scale" (Marlin MoE: the tile is rounded without the expert's
    # global factor, then multiplied by bf16(router weight × global factor) and rounded).
    down_scale: str = "fp32"


# Triton-style staged kernels: the gate/up product is written in the output dtype, the
# activation writes its own output, each expert's down output is stored before the sum.
STAGED = MoeRounding(frozenset({"h", "gate", "inter", "down"}))
# Marlin MoE (csrc/moe/marlin_moe_wna16, docs/kernel-arithmetic.md): staged, and its down
# GEMM's epilogue rounds the router weight times the NVFP4 global factor to bf16. Confirmed bit
# for bit on the H100's recorded NVFP4 experts.
MARLIN = MoeRounding(STAGED.points, down_scale="bf16-scale")
# Experts kernels whose rounding is not STAGED, by class name.
KERNEL_ROUNDING = {"MarlinExperts": MARLIN}


def rounding_of(kernel: str, default: MoeRounding = STAGED) -> MoeRounding:
    """The rounding of an experts kernel named `kernel` (`A[B|C]`: by A), else `default`."""
    return KERNEL_ROUNDING.get(kernel.split("[")[0], default)


def cpu_grouped(mode: str) -> MoeRounding:
    """vLLM's CPU grouped-GEMM experts (csrc/cpu/cpu_fused_moe.cpp, 0.32): fp32 GEMMs and
    activation, the gated intermediate stored in bf16, the down outputs weighted and summed in
    fp32, one conversion at the end. `mode` is how the build converts fp32 to bf16."""
    return MoeRounding(frozenset({"inter"}), mode)


def convert(v: torch.Tensor, dtype: torch.dtype, mode: str = "nearest") -> torch.Tensor:
    """fp32 `v` stored in `dtype` and read back, rounded to nearest or toward zero."""
    if mode == "truncate" and dtype == torch.bfloat16:
        # bf16 is the upper half of an fp32: dropping the lower 16 bits rounds toward zero.
        bits = v.float().contiguous().view(torch.int32) & ~0xFFFF
        return bits.view(torch.float32)
    return v.to(dtype).float()


def _moe(sample: MoeSample, x: torch.Tensor, topk_weights: torch.Tensor,
         topk_ids: torch.Tensor, rounding: MoeRounding | None) -> torch.Tensor:
    """Σ over each token's sampled experts of weight × down(silu(gate·x) ⊙ up·x), fp32.

    With `rounding`, activations are quantized as the scheme says and values are stored in
    the output dtype where the kernel family stores them.
    """
    scheme_rounding = rounding is not None
    points = rounding.points if rounding is not None else frozenset()
    mode = rounding.mode if rounding is not None else "nearest"
    out = torch.zeros(x.shape[0], sample.rows.numel(), dtype=torch.float32)
    xf = x.float()
    weights = topk_weights.float().cpu()
    ids = topk_ids.long().cpu()
    for global_id, expert in zip(sample.global_ids, sample.experts, strict=True):
        # Routing gives unsampled experts zero weight, so only sampled ones contribute.
        hit = (ids == global_id) & (weights != 0)
        tokens = hit.any(dim=1).nonzero().flatten()
        if tokens.numel() == 0:
            continue
        scale = (weights * hit).sum(dim=1)[tokens].unsqueeze(1)
        xt = xf[tokens]
        act13, act2 = sample.expert_activations.get(expert,
                                                    (sample.activation, sample.activation))
        if scheme_rounding:
            xt = quantize_activations(xt, act13)
        w13, w2 = sample.w13[expert], sample.w2[expert]
        # NVFP4 keeps q·s (exact in bf16) at the MMA and applies its global factor in fp32.
        if scheme_rounding and expert not in sample.w2_global_factor:
            w13 = weights_at_mma(w13, act13, sample.out_dtype)
            w2 = weights_at_mma(w2, act2, sample.out_dtype)
        half = w13.shape[0] // 2
        h = xt @ w13.t()
        if "h" in points:
            h = convert(h, sample.out_dtype, mode)
        gate = torch.nn.functional.silu(h[:, :half])
        if "gate" in points:
            gate = convert(gate, sample.out_dtype, mode)
        inter = gate * h[:, half:]
        if "inter" in points:
            inter = convert(inter, sample.out_dtype, mode)
        if scheme_rounding:
            inter = quantize_activations(inter, act2)
        if rounding is not None and rounding.down_scale == "bf16-scale":
            factor = sample.w2_global_factor.get(expert, 1.0)
            tile = convert(inter @ (w2 / factor).t(), sample.out_dtype, mode)
            out.index_add_(0, tokens, convert(
                tile * convert(scale * factor, sample.out_dtype, mode), sample.out_dtype, mode))
            continue
        down = inter @ w2.t()
        if "down" in points:
            down = convert(down, sample.out_dtype, mode)
        out.index_add_(0, tokens, scale * down)
    return convert(out, sample.out_dtype, mode) if scheme_rounding else out


def moe_exact(sample: MoeSample, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    return _moe(sample, x, topk_weights, topk_ids, None)


def moe_ideal(sample: MoeSample, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, rounding: MoeRounding = STAGED) -> torch.Tensor:
    """What the scheme allows a kernel that rounds as `rounding` says."""
    return _moe(sample, x, topk_weights, topk_ids, rounding)
