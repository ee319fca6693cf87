"""FP8 block-scaled arithmetic in plain torch: the one definition kernels, demo and checks share."""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)


def expand_block_scales(scale: torch.Tensor, block: tuple[int, int],
                        shape: tuple[int, int]) -> torch.Tensor:
    """Per-element fp32 scales of a (rows, cols) weight from its per-block scales."""
    rows, cols = shape
    expanded = scale.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return expanded[:rows, :cols]


def dequantize_fp8_block(weight: torch.Tensor, scale: torch.Tensor,
                         block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """fp32 weight = fp8 weight × its block's scale (`weight_scale_inv` in checkpoints)."""
    return weight.float() * expand_block_scales(scale, block, tuple(weight.shape))  # type: ignore[arg-type]


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


def fake_quantize_activation(x: torch.Tensor, activation: object) -> torch.Tensor:
    """Activations after the round trip of a 4-bit or microscaled format (see selfcheck.schemes).

    Formats are added with the schemes that use them; an unknown one is an error, never a
    silent pass-through that would make a kernel look better than its scheme.
    """
    fmt = getattr(activation, "fmt", "?")
    raise NotImplementedError(f"no activation fake-quantization for format {fmt}")
