"""Reference GEMMs in fp32: the exact product and the scheme's own ideal.

`exact`  — activations as given, weights as the checkpoint defines them (fp32).
`ideal`  — activations quantized exactly as the scheme prescribes (fp32 scales), then the
           same product, rounded to the layer's output dtype: the best any honest kernel of
           the scheme can do. A kernel far below it is losing accuracy of its own.
MoE layers: the same for each token's experts, SiLU-gated, weighted by the routing.
"""

from __future__ import annotations

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


def exact(sample: LinearSample, x: torch.Tensor) -> torch.Tensor:
    """fp32 product of the activations with the checkpoint's sampled rows."""
    return x.float() @ sample.weight.t()


def ideal(sample: LinearSample, x: torch.Tensor) -> torch.Tensor:
    """What the scheme allows: quantized activations, fp32 scales, output in its dtype."""
    out = quantize_activations(x, sample.activation) @ sample.weight.t()
    return out.to(sample.out_dtype).float()


def _moe(sample: MoeSample, x: torch.Tensor, topk_weights: torch.Tensor,
         topk_ids: torch.Tensor, scheme_rounding: bool) -> torch.Tensor:
    """Σ over each token's sampled experts of weight × down(silu(gate·x) ⊙ up·x), fp32."""
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
        if scheme_rounding:
            xt = quantize_activations(xt, sample.activation)
        w13 = sample.w13[expert]
        half = w13.shape[0] // 2
        h = xt @ w13.t()
        if scheme_rounding:
            h = h.to(sample.out_dtype).float()  # kernels keep the gate/up product in it
        gate = torch.nn.functional.silu(h[:, :half])
        if scheme_rounding:
            gate = gate.to(sample.out_dtype).float()  # the activation's own output dtype
        inter = gate * h[:, half:]
        if scheme_rounding:
            inter = quantize_activations(inter.to(sample.out_dtype).float(), sample.activation)
        down = inter @ sample.w2[expert].t()
        if scheme_rounding:
            down = down.to(sample.out_dtype).float()  # each expert's output before the sum
        out.index_add_(0, tokens, scale * down)
    return out.to(sample.out_dtype).float() if scheme_rounding else out


def moe_exact(sample: MoeSample, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    return _moe(sample, x, topk_weights, topk_ids, scheme_rounding=False)


def moe_ideal(sample: MoeSample, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    return _moe(sample, x, topk_weights, topk_ids, scheme_rounding=True)
