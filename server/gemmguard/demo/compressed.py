"""compressed-tensors checkpoints, written by the compressed-tensors package itself.

Weights are quantized and packed by its compressors (the code llm-compressor saves with) and
the `quantization_config` is its own `QuantizationConfig`, so vLLM's compressed-tensors
loader reads exactly what it reads from a real W4A16, W4A8, NVFP4, W8A8 or FP8-dynamic
checkpoint. W4A8 comes in both of vLLM's kinds: fp8 activations (int4 packed in int32,
CUTLASS on Hopper) and int8 activations (int4 codes stored one per int8, "int-quantized";
vLLM's CPU kernels).
"""

from __future__ import annotations

from typing import Any

import torch

# Demo scheme → (compressed-tensors preset, on-disk format).
PRESETS = {
    "w4a16-g128": ("W4A16", "pack-quantized"),
    "w4a8-g128": ("W4AFP8", "pack-quantized"),
    "w4a8-int8-g128": ("W4A8", "int-quantized"),
    "nvfp4": ("NVFP4", "nvfp4-pack-quantized"),
    # Per-channel weights, dynamic per-token activations: vLLM's scaled-mm kernels (CUTLASS).
    "w8a8-int8": ("W8A8", "int-quantized"),
    "fp8-dynamic": ("FP8_DYNAMIC", "float-quantized"),
    # Weight-only: int8 groups (Marlin/Machete on Hopper), MXFP4 (Marlin on Hopper).
    "w8a16-g128": ("W8A16", "pack-quantized"),
    "mxfp4a16": ("MXFP4A16", "mxfp4-pack-quantized"),
}
# Scales are stored in the model's dtype, as llm-compressor saves them (NVFP4 keeps fp8).
SCALE_DTYPE = torch.bfloat16
# NVFP4 activations need a calibrated global scale; the demo assumes this activation range
# (RMS-normed hidden states with unit-ish norm weights stay well inside it).
NVFP4_ACTIVATION_AMAX = 8.0


def _scheme(scheme: str) -> Any:
    from compressed_tensors.quantization import preset_name_to_scheme

    preset, fmt = PRESETS[scheme]
    quant_scheme = preset_name_to_scheme(preset, ["Linear"])
    quant_scheme.format = fmt
    return quant_scheme


def compress(weight: torch.Tensor, scheme: str,
             fused_with: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One linear weight (out, in) in `scheme`'s on-disk tensors, keyed by suffix.

    `fused_with`: the weights vLLM fuses with this one (q/k/v, gate/up). NVFP4 gives them
    one global scale, as llm-compressor does, since vLLM's kernels keep one per fused layer.
    """
    from compressed_tensors.compressors import (
        FloatQuantizationCompressor,
        IntQuantizationCompressor,
        MXFP4PackedCompressor,
        NVFP4PackedCompressor,
        PackedQuantizationCompressor,
    )
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    quant_scheme = _scheme(scheme)
    args = quant_scheme.weights
    rows, cols = weight.shape
    group = args.group_size or cols  # per-channel schemes: one group per row
    blocks = weight.float().reshape(rows, cols // group, group)
    global_scale = None
    if args.strategy == "tensor_group":
        group = [weight, *(fused_with or [])]
        global_scale = generate_gparam(torch.stack([w.min() for w in group]).min(),
                                       torch.stack([w.max() for w in group]).max())
    scale, zero = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale)
    if scale.dtype.itemsize > 1:
        scale = scale.to(SCALE_DTYPE)
    state = {"weight": weight.float(), "weight_scale": scale, "weight_zero_point": zero}
    if global_scale is not None:
        state["weight_global_scale"] = global_scale
    compressor = {"pack-quantized": PackedQuantizationCompressor,
                  "nvfp4-pack-quantized": NVFP4PackedCompressor,
                  "int-quantized": IntQuantizationCompressor,
                  "float-quantized": FloatQuantizationCompressor,
                  "mxfp4-pack-quantized": MXFP4PackedCompressor}[PRESETS[scheme][1]]
    out = dict(compressor.compress(state, quant_scheme))
    if quant_scheme.input_activations is not None and args.strategy == "tensor_group":
        out["input_global_scale"] = torch.tensor(
            [448.0 * 6.0 / NVFP4_ACTIVATION_AMAX], dtype=torch.float32)
    return {name: tensor.contiguous() for name, tensor in out.items()}


def quantization_config(scheme: str, ignore: list[str]) -> dict[str, Any]:
    """The `quantization_config` of config.json, as compressed-tensors serializes it."""
    from compressed_tensors.quantization import QuantizationConfig

    quant_scheme = _scheme(scheme)
    config = QuantizationConfig(config_groups={"group_0": quant_scheme},
                                format=PRESETS[scheme][1], ignore=ignore,
                                quantization_status="compressed")
    dumped: dict[str, Any] = config.model_dump(mode="json")
    return dumped
