"""Reference GEMMs in fp32, one per scheme: the exact product and the scheme's own ideal.

`exact`  — activations as given, weights dequantized from the checkpoint sample.
`ideal`  — activations quantized exactly as the scheme prescribes (fp32 scales), then the
           same product, rounded to the layer's output dtype: the best any honest kernel of
           the scheme can do. A kernel far below it is losing accuracy of its own.
"""

from __future__ import annotations

import torch

from gemmguard import numerics
from gemmguard.selfcheck.sample import Activation, LayerSample

INT8_MAX = 127.0


def dequantized_rows(sample: LayerSample) -> torch.Tensor:
    """The sampled weight rows in fp32, as the checkpoint defines them."""
    weight = sample.weight.float()
    if sample.scale is None:
        return weight
    if sample.block is not None:
        cols = sample.block[1]
        scale = sample.scale.repeat_interleave(cols, dim=1)[:, : weight.shape[1]]
        return weight * scale
    return weight * sample.scale


def _fake_quant_fp8(x: torch.Tensor, activation: Activation) -> torch.Tensor:
    if activation.kind == "group":
        return numerics.fake_quantize_fp8_groups(x, activation.size)
    if activation.kind == "token":
        scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / numerics.FP8_MAX
    elif activation.kind == "tensor":
        scale = x.abs().amax().clamp(min=1e-12) / numerics.FP8_MAX
    else:  # static
        scale = torch.tensor(activation.static_scale)
    q = (x / scale).clamp(-numerics.FP8_MAX, numerics.FP8_MAX).to(numerics.FP8_DTYPE)
    return q.float() * scale


def _fake_quant_int8(x: torch.Tensor, activation: Activation) -> torch.Tensor:
    if activation.kind == "static":
        scale = torch.tensor(activation.static_scale)
    elif activation.kind == "tensor":
        scale = x.abs().amax().clamp(min=1e-12) / INT8_MAX
    else:
        scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / INT8_MAX
    return (x / scale).round().clamp(-INT8_MAX, INT8_MAX) * scale


def quantized_activations(sample: LayerSample, x: torch.Tensor) -> torch.Tensor:
    """`x` in fp32 after the round trip the scheme prescribes for activations."""
    xf = x.float()
    if sample.scheme.startswith("fp8-") and sample.activation.kind != "none":
        return _fake_quant_fp8(xf, sample.activation)
    if sample.scheme.startswith("int8-") and sample.activation.kind != "none":
        return _fake_quant_int8(xf, sample.activation)
    return xf


def exact(sample: LayerSample, x: torch.Tensor) -> torch.Tensor:
    """fp32 product of the activations with the checkpoint's sampled rows."""
    return x.float() @ dequantized_rows(sample).t()


def ideal(sample: LayerSample, x: torch.Tensor) -> torch.Tensor:
    """What the scheme allows: quantized activations, fp32 scales, output in its dtype."""
    out = quantized_activations(sample, x) @ dequantized_rows(sample).t()
    return out.to(sample.out_dtype).float()
