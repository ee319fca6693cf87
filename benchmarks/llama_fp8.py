"""A Llama-3-8B-shaped FP8 block-scaled checkpoint with random weights, made where it runs.

Nothing can be downloaded on the lent GPUs, so the GPU benchmark makes its model: vLLM's `fp8`
format (e4m3 weights, one fp32 `weight_scale_inv` per 128×128 block, dynamic activation scales),
Llama-3-8B's shapes by default, weights drawn on the GPU when there is one. The tokenizer is
gemmguard's demo byte tokenizer with its vocabulary filled up to the model's, so that every id
the random weights emit decodes to text:

    python -m benchmarks.llama_fp8 --out /tmp/llama8b-fp8              # 8B shapes, ~9 GB
    python -m benchmarks.llama_fp8 --out /tmp/tiny --layers 2 --hidden 256 --intermediate 512 \\
        --heads 4 --kv-heads 2 --vocab 1024                            # a tiny one, for tests
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from gemmguard.demo.tokenizer import SPECIAL_TOKENS, tokenizer_json, write_tokenizer
from gemmguard.numerics import quantize_fp8_block

BLOCK = 128
LAYERS_PER_SHARD = 4


@dataclass(frozen=True)
class Shape:
    """Llama-3-8B's shape by default."""

    layers: int = 32
    hidden: int = 4096
    intermediate: int = 14336
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 128256

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def config(shape: Shape) -> dict[str, object]:
    """config.json: Llama, bf16 activations, vLLM's FP8 block quantization."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads, "head_dim": shape.head_dim,
        "vocab_size": shape.vocab, "max_position_embeddings": 8192, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
        "bos_token_id": 256, "eos_token_id": 258,
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                "activation_scheme": "dynamic",
                                "weight_block_size": [BLOCK, BLOCK]},
    }


def _linears(shape: Shape) -> dict[str, tuple[int, int]]:
    h, d = shape.hidden, shape.head_dim
    return {"self_attn.q_proj": (shape.heads * d, h), "self_attn.k_proj": (shape.kv_heads * d, h),
            "self_attn.v_proj": (shape.kv_heads * d, h), "self_attn.o_proj": (h, shape.heads * d),
            "mlp.gate_proj": (shape.intermediate, h), "mlp.up_proj": (shape.intermediate, h),
            "mlp.down_proj": (h, shape.intermediate)}


def _layer(index: int, shape: Shape, gen: torch.Generator, device: str) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{index}."
    out: dict[str, torch.Tensor] = {}
    for name, (n, k) in _linears(shape).items():
        weight = torch.randn(n, k, generator=gen, device=device, dtype=torch.bfloat16) * 0.02
        fp8, scale_inv = quantize_fp8_block(weight, (BLOCK, BLOCK))
        out[prefix + name + ".weight"] = fp8.cpu()
        out[prefix + name + ".weight_scale_inv"] = scale_inv.cpu()
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[prefix + norm + ".weight"] = torch.ones(shape.hidden, dtype=torch.bfloat16)
    return out


def write_tokenizer_for(out: Path, vocab: int) -> None:
    """The demo byte tokenizer, its vocabulary filled with `<|fill_N|>` up to `vocab` ids."""
    write_tokenizer(out, max_length=8192)
    tokenizer = tokenizer_json()
    model: dict[str, dict[str, int]] = tokenizer["model"]  # type: ignore[assignment]
    # The specials (ids 256-258) join the model's vocabulary too: the tokenizers library gives an
    # added token that is not in it the next free id, which after the fill is no longer 256.
    model["vocab"].update({token: 256 + i for i, token in enumerate(SPECIAL_TOKENS)})
    # Plain vocabulary entries, never produced by encoding (there are no merges): they only
    # give every id of the model's vocabulary a text to decode to.
    taken = 256 + len(SPECIAL_TOKENS)
    model["vocab"].update({f"<|fill_{i}|>": i for i in range(taken, vocab)})
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False) + "\n")


def write(out: Path, shape: Shape, seed: int = 0) -> Path:
    """Write config, weights (in shards, with an index) and tokenizer into `out`."""
    for size, name in ((shape.hidden, "hidden"), (shape.intermediate, "intermediate"),
                       (shape.kv_heads * shape.head_dim, "kv heads × head_dim")):
        if size % BLOCK:
            raise ValueError(f"Checkpoint {name} is {size}; it must be a multiple of {BLOCK} for "
                             "128×128 FP8 blocks.")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    shards = [list(range(i, min(i + LAYERS_PER_SHARD, shape.layers)))
              for i in range(0, shape.layers, LAYERS_PER_SHARD)]
    for number, layers in enumerate([*shards, []], start=1):
        tensors: dict[str, torch.Tensor] = {}
        for index in layers:
            tensors.update(_layer(index, shape, gen, device))
        if not layers:  # the last shard: embeddings, final norm, LM head (kept in bf16)
            for name in ("model.embed_tokens.weight", "lm_head.weight"):
                tensors[name] = (torch.randn(shape.vocab, shape.hidden, generator=gen,
                                             device=device, dtype=torch.bfloat16) * 0.02).cpu()
            tensors["model.norm.weight"] = torch.ones(shape.hidden, dtype=torch.bfloat16)
        filename = f"model-{number:05d}-of-{len(shards) + 1:05d}.safetensors"
        save_file(tensors, str(out / filename), {"format": "pt"})
        weight_map.update({name: filename for name in tensors})
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    (out / "config.json").write_text(json.dumps(config(shape), indent=2) + "\n")
    generation = {"bos_token_id": 256, "eos_token_id": 258, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation) + "\n")
    write_tokenizer_for(out, shape.vocab)
    return out


def main(argv: list[str] | None = None) -> int:
    d = Shape()
    p = argparse.ArgumentParser(prog="python -m benchmarks.llama_fp8",
                                description="Write a random Llama-shaped FP8 block checkpoint.")
    p.add_argument("--out", type=Path, required=True, help="Folder to write into.")
    for name in asdict(d):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name),
                       help=f"Model {name}. Default: {getattr(d, name)} (Llama-3-8B).")
    p.add_argument("--seed", type=int, default=0, help="Random seed. Default: 0.")
    args = p.parse_args(argv)
    shape = Shape(**{name: getattr(args, name) for name in asdict(d)})
    start = time.perf_counter()
    write(args.out, shape, args.seed)
    print(f"Wrote {args.out} ({shape}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
