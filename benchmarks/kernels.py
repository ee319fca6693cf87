"""Issue 4: the portable FP8 block kernels' per-call time against BF16 `F.linear`.

Runs gemmguard's own kernel classes (`gemmguard.kernels.portable_fp8_block`) on vLLM's FP8
block-scaled layer config: weights quantized to 128×128 FP8 blocks, loaded with the kernel's
`process_weights_after_loading`, then `apply_weights` timed per call. The baseline is
`F.linear` on the same weights in BF16, which is what vLLM's CPU build runs for a BF16 layer
on this machine. Run as a module it prints one JSON object:

    python -m benchmarks.kernels --shapes demo,4096 --tokens 1,16,128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

KERNELS = ("PortableFp8BlockDequantKernel", "PortableFp8BlockEmulatedKernel")


def demo_shapes() -> dict[str, tuple[int, int]]:
    """(out, in) of the demo model's linear layers as vLLM runs them (q/k/v and gate/up fused)."""
    from gemmguard.demo import DemoSpec

    spec = DemoSpec()
    h, i, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q, kv = spec.num_attention_heads * d, spec.num_key_value_heads * d
    return {"demo qkv_proj": (q + 2 * kv, h), "demo o_proj": (h, q),
            "demo gate_up_proj": (2 * i, h), "demo down_proj": (h, i)}


def shapes_for(names: list[str]) -> dict[str, tuple[int, int]]:
    """Named shape sets: `demo` (the demo model's layers) and `4096` (a 4096×4096 layer)."""
    out: dict[str, tuple[int, int]] = {}
    for name in names:
        if name == "demo":
            out.update(demo_shapes())
        elif name == "4096":
            out["4096x4096"] = (4096, 4096)
        else:
            raise ValueError(f"Kernel shape set '{name}' is not known; use demo or 4096.")
    return out


def _per_call_s(fn: Callable[[], Any], min_time_s: float) -> float:
    """Seconds per call, from enough back-to-back calls to fill `min_time_s`."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    number = max(1, min(1000, int(min_time_s / once)))
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def _kernel_layer(cls: type, config: Any, fp8: torch.Tensor, scale: torch.Tensor) -> tuple[
        Any, torch.nn.Module]:
    layer = torch.nn.Module()
    layer.register_parameter("weight", torch.nn.Parameter(fp8.clone(), requires_grad=False))
    layer.register_parameter("weight_scale_inv",
                             torch.nn.Parameter(scale.clone(), requires_grad=False))
    kernel = cls(config)
    kernel.process_weights_after_loading(layer)
    return kernel, layer


def _config(shape: tuple[int, int]) -> Any:
    from vllm.model_executor.kernels.linear.scaled_mm.ScaledMMLinearKernel import (
        FP8ScaledMMLinearLayerConfig,
    )
    from vllm.model_executor.layers.quantization.utils import quant_utils

    # 128×128 weight blocks and dynamic 1×128 activation groups: the FP8 block scheme.
    return FP8ScaledMMLinearLayerConfig(
        weight_quant_key=quant_utils.kFp8Static128BlockSym,
        activation_quant_key=quant_utils.kFp8Dynamic128Sym,
        weight_shape=shape, input_dtype=torch.bfloat16, out_dtype=torch.bfloat16,
    )


def measure(shapes: dict[str, tuple[int, int]], tokens: list[int], repeats: int,
            min_time_s: float, seed: int = 0) -> dict[str, Any]:
    """Per-call seconds of F.linear and each portable kernel, per shape and token count."""
    from vllm.config import VllmConfig, set_current_vllm_config

    from gemmguard import numerics
    from gemmguard.kernels.portable_fp8_block import build_kernels

    gen = torch.Generator().manual_seed(seed)
    rows = []
    # The kernels build vLLM's activation quantizer, a CustomOp that reads the current config.
    with set_current_vllm_config(VllmConfig()):
        classes = dict(zip(KERNELS, build_kernels(), strict=True))
        for name, (n, k) in shapes.items():
            weight = torch.randn(n, k, generator=gen) * 0.02
            fp8, scale = numerics.quantize_fp8_block(weight)
            bf16 = numerics.dequantize_fp8_block(fp8, scale).to(torch.bfloat16)
            config = _config((n, k))
            loaded = {kn: _kernel_layer(cls, config, fp8, scale) for kn, cls in classes.items()}
            for m in tokens:
                x = (torch.randn(m, k, generator=gen) * 0.5).to(torch.bfloat16)
                calls: dict[str, Callable[[], Any]] = {
                    "bf16_linear": lambda x=x, w=bf16: torch.nn.functional.linear(x, w)}
                for kn, (kernel, layer) in loaded.items():
                    calls[kn] = lambda x=x, kernel=kernel, layer=layer: kernel.apply_weights(
                        layer, x)
                samples: dict[str, list[float]] = {c: [] for c in calls}
                for _ in range(repeats):  # interleaved, so drift hits every path alike
                    for c, fn in calls.items():
                        samples[c].append(_per_call_s(fn, min_time_s))
                base = torch.nn.functional.linear(x, bf16).float()
                dequant = calls[KERNELS[0]]().float()
                seconds = {c: statistics.median(v) for c, v in samples.items()}
                rows.append({
                    "shape": name, "n": n, "k": k, "tokens": m, "seconds": seconds,
                    "spread": {c: [min(v), max(v)] for c, v in samples.items()},
                    "ratio_vs_bf16": {kn: seconds[kn] / seconds["bf16_linear"]
                                      for kn in KERNELS},
                    # Same weights, same GEMM: the dequant kernel must equal F.linear exactly.
                    "dequant_max_abs_diff": float((dequant - base).abs().max()),
                })
    return {"mode": "gemmguard kernel classes, apply_weights per call",
            "torch_threads": torch.get_num_threads(), "repeats": repeats,
            "min_time_s": min_time_s, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels",
                                     description="Time the portable FP8 block kernels.")
    parser.add_argument("--shapes", default="demo,4096",
                        help="Shape sets, comma-separated: demo, 4096. Default: demo,4096.")
    parser.add_argument("--tokens", default="1,16,128",
                        help="Token counts (M), comma-separated. Default: 1,16,128.")
    parser.add_argument("--repeats", type=int, default=5,
                        help="Interleaved repeats per path; the median is kept. Default: 5.")
    parser.add_argument("--min-time", type=float, default=0.1,
                        help="Seconds of back-to-back calls per repeat. Default: 0.1.")
    args = parser.parse_args(argv)
    result = measure(shapes_for(args.shapes.split(",")),
                     [int(t) for t in args.tokens.split(",")], args.repeats, args.min_time)
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
