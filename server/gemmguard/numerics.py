"""FP8 block-scaled arithmetic in plain torch: the one definition kernels, demo and checks share."""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)


def pow2_ceil(scale: torch.Tensor) -> torch.Tensor:
    """The smallest power of two ≥ each scale (E8M0/UE8M0 scales, as DeepGEMM rounds them)."""
    return torch.exp2(torch.ceil(torch.log2(scale.clamp(min=1e-30))))


def expand_block_scales(scale: torch.Tensor, block: tuple[int, int],
                        shape: tuple[int, ...]) -> torch.Tensor:
    """Per-element fp32 scales of a (rows, cols) weight from its per-block scales."""
    rows, cols = shape
    expanded = scale.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return expanded[:rows, :cols]


def dequantize_fp8_block(weight: torch.Tensor, scale: torch.Tensor,
                         block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """fp32 weight = fp8 weight × its block's scale (`weight_scale_inv` in checkpoints)."""
    return weight.float() * expand_block_scales(scale, block, tuple(weight.shape))


def quantize_fp8_block(weight: torch.Tensor,
                       block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight to fp8 with one fp32 scale per block; returns (fp8, scale_inv)."""
    rows, cols = weight.shape
    br, bc = block
    blocks = weight.float().reshape(rows // br, br, cols // bc, bc)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    return q.reshape(rows, cols).to(FP8_DTYPE), scale_inv.contiguous()


def quantize_fp8_groups(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token-group activation quantization (1×group), fp32 scales.

    Returns (x_fp8, scales) with scales of shape (tokens, ceil(K / group)).
    """
    tokens, k = x.shape
    pad = (-k) % group
    xf = torch.nn.functional.pad(x.float(), (0, pad)).reshape(tokens, -1, group)
    scale = xf.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX
    q = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.reshape(tokens, -1)[:, :k], scale


def fake_quantize_fp8_groups(x: torch.Tensor, group: int = 128) -> torch.Tensor:
    """x after a round trip through 1×group fp8 quantization, in fp32."""
    q, scale = quantize_fp8_groups(x, group)
    tokens, k = x.shape
    pad = (-k) % group
    qf = torch.nn.functional.pad(q.float(), (0, pad)).reshape(tokens, -1, group)
    return (qf * scale[..., None]).reshape(tokens, -1)[:, :k]


# --- 4-bit floats and microscaling (OCP MX, NVFP4) -----------------------------------------------

E2M1_MAX = 6.0
# The 16 codes of e2m1 (sign bit 3, 2 exponent bits, 1 mantissa bit), as checkpoints store them.
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
E8M0_BIAS = 127
MX_BLOCK = 32
NVFP4_BLOCK = 16
# Exponent of the largest value of an MX element type: the OCP rule aligns the block's
# largest exponent with it (e2m1: 6 = 1.5·2², e4m3: 448 = 1.75·2⁸).
_MX_ELEMENTS = {"mxfp4": (E2M1_MAX, 2, 1), "mxfp8": (FP8_MAX, 8, 3)}  # max, emax, mantissa bits


def decode_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """fp32 values of packed e2m1 bytes (..., n) → (..., 2n); the low nibble comes first."""
    codes = packed.to(torch.uint8)
    nibbles = torch.stack((codes & 0x0F, codes >> 4), dim=-1).flatten(-2).long()
    return E2M1_VALUES.to(packed.device)[nibbles]


def decode_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """fp32 powers of two of E8M0 scales (uint8 exponents, bias 127; 255 is NaN)."""
    biased = scale.view(torch.uint8) if scale.dtype != torch.uint8 else scale
    value = torch.exp2(biased.float() - E8M0_BIAS)
    return torch.where(biased == 255, torch.full_like(value, float("nan")), value)


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """x (fp32) rounded to the nearest e2m1 value, ties to even, saturating at ±6."""
    mag = x.abs()
    # Spacing is 0.5 below 2, 1 below 4, 2 above; torch.round breaks ties to even.
    rounded = torch.where(mag < 2, torch.round(mag * 2) / 2,
                          torch.where(mag < 4, torch.round(mag), torch.round(mag / 2) * 2))
    return torch.copysign(rounded.clamp(max=E2M1_MAX), x)


def _round_elements(x: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "mxfp4":
        return round_to_e2m1(x)
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float()


def mx_block_exponents(amax: torch.Tensor, fmt: str, rule: str) -> torch.Tensor:
    """Unbiased E8M0 exponent of each block's scale, from the block's largest magnitude.

    rule "ceil": the smallest power of two with amax / scale ≤ the element maximum, so
    nothing saturates (NVIDIA's cvt.rp.satfinite.ue8m0, FlashInfer/TRT-LLM, triton_kernels,
    vLLM's own MXFP8 quantizer). rule "even": the OCP MX spec, floor(log2(amax)) minus the
    element's largest exponent after rounding amax to the element's precision (vLLM's MXFP4
    downcast, AITER, Quark, compressed-tensors); the largest values may saturate.
    """
    elem_max, emax, mbits = _MX_ELEMENTS[fmt]
    amax = amax.float()
    if rule == "ceil":
        ratio = amax / elem_max
        mantissa, exponent = torch.frexp(ratio)  # ratio = mantissa · 2^exponent, mantissa ≥ 0.5
        exp = torch.where(mantissa == 0.5, exponent - 1, exponent).float()
    elif rule == "even":
        bits = amax.view(torch.int32)
        rounded = ((bits + (1 << (23 - mbits - 1))) & 0x7F800000).view(torch.float32)
        exp = torch.floor(torch.log2(rounded)) - emax
    else:
        raise ValueError(f"unknown MX scale rule {rule!r}; use 'ceil' or 'even'")
    exp = torch.where(amax > 0, exp, torch.full_like(exp, -E8M0_BIAS))
    return exp.clamp(-E8M0_BIAS, E8M0_BIAS)


def fake_quantize_mx(x: torch.Tensor, fmt: str, rule: str, block: int = MX_BLOCK) -> torch.Tensor:
    """x (tokens, K) after a round trip through an MX format (1×block, E8M0 scales), fp32."""
    tokens, k = x.shape
    if k % block:
        raise ValueError(f"MX activations need K divisible by {block}, got K={k}")
    blocks = x.float().reshape(tokens, k // block, block)
    scale = torch.exp2(mx_block_exponents(blocks.abs().amax(dim=-1), fmt, rule))[..., None]
    return (_round_elements(blocks / scale, fmt) * scale).reshape(tokens, k)


def fake_quantize_nvfp4(x: torch.Tensor, global_scale: float,
                        block: int = NVFP4_BLOCK) -> torch.Tensor:
    """x (tokens, K) after NVFP4 quantization with a static global scale, fp32.

    `global_scale` is the divisor form the kernels use (compressed-tensors'
    `input_global_scale`, 1/`input_scale` for ModelOpt): block scale = e4m3(G·amax/6), values =
    e2m1(x·G/scale). The operation order is vLLM's reference (`ref_nvfp4_quant`), which is
    what the CUDA quantizers compute up to approximate reciprocals.
    """
    tokens, k = x.shape
    if k % block:
        raise ValueError(f"NVFP4 activations need K divisible by {block}, got K={k}")
    g = torch.tensor(global_scale, dtype=torch.float32)
    blocks = x.float().reshape(tokens, k // block, block)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    scale = (g * (amax * (1.0 / E2M1_MAX))).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float()
    inv_g = 1.0 / (g + (g == 0) * 1e8)
    denominator = scale * inv_g
    output_scale = 1.0 / (denominator + (denominator == 0) * 1e8)
    q = round_to_e2m1((blocks * output_scale).clamp(-E2M1_MAX, E2M1_MAX))
    return (q * (scale / g)).reshape(tokens, k)


def fake_quantize_activation(x: torch.Tensor, activation: object) -> torch.Tensor:
    """Activations after the round trip of a 4-bit or microscaled format (see selfcheck.schemes).

    Formats: "mxfp4-ceil", "mxfp4-even", "mxfp8-ceil", "mxfp8-even" (1×32 blocks, E8M0 scales,
    the suffix is the scale rule of `mx_block_exponents`) and "nvfp4" (1×16 blocks, e4m3
    scales under a static global scale carried in `static_scale`). An unknown format is an
    error, never a silent pass-through that would make a kernel look better than its scheme.
    """
    fmt = str(getattr(activation, "fmt", "?"))
    size = int(getattr(activation, "size", 0) or 0)
    if fmt == "nvfp4":
        return fake_quantize_nvfp4(x, float(getattr(activation, "static_scale", 0.0)),
                                   size or NVFP4_BLOCK)
    family, _, rule = fmt.partition("-")
    if family in _MX_ELEMENTS and rule in ("ceil", "even"):
        return fake_quantize_mx(x, family, rule, size or MX_BLOCK)
    raise NotImplementedError(f"no activation fake-quantization for format {fmt}")
