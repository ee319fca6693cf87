"""Tiny Qwen3-style checkpoints, byte-identical for the same seed.

Every GEMM dimension is a multiple of 128 so that 128×128 block quantization applies
without padding, which is the shape real FP8 block-scaled checkpoints have.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from gemmguard.demo.tokenizer import SPECIAL_TOKENS, write_tokenizer
from gemmguard.errors import UsageError
from gemmguard.numerics import quantize_fp8_block

SCHEMES = ("bf16", "fp8-block")
FP8_BLOCK = 128


@dataclass(frozen=True)
class DemoSpec:
    """Shape of a demo checkpoint; the defaults give about 2 M parameters."""

    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    vocab_size: int = 384
    max_position_embeddings: int = 2048

    def __post_init__(self) -> None:
        sizes = {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "q_proj rows (heads × head_dim)": self.num_attention_heads * self.head_dim,
            "k_proj rows (kv heads × head_dim)": self.num_key_value_heads * self.head_dim,
        }
        for name, size in sizes.items():
            if size % FP8_BLOCK:
                raise UsageError(
                    f"Demo model {name} is {size}; it must be a multiple of {FP8_BLOCK} "
                    "so 128×128 block quantization applies."
                )
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise UsageError(f"Demo vocab_size {self.vocab_size} is below the 259 byte tokens.")


def _linear_shapes(spec: DemoSpec) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer in one decoder layer."""
    h, i, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    return {
        "self_attn.q_proj": (spec.num_attention_heads * d, h),
        "self_attn.k_proj": (spec.num_key_value_heads * d, h),
        "self_attn.v_proj": (spec.num_key_value_heads * d, h),
        "self_attn.o_proj": (h, spec.num_attention_heads * d),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }


def _tensors(spec: DemoSpec, scheme: str, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * std

    def norm_weight(n: int) -> torch.Tensor:
        return (1.0 + normal(n, std=0.05)).to(torch.bfloat16)

    h = spec.hidden_size
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": normal(spec.vocab_size, h, std=0.5).to(torch.bfloat16),
    }
    for layer in range(spec.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        out[f"{prefix}.input_layernorm.weight"] = norm_weight(h)
        out[f"{prefix}.post_attention_layernorm.weight"] = norm_weight(h)
        out[f"{prefix}.self_attn.q_norm.weight"] = norm_weight(spec.head_dim)
        out[f"{prefix}.self_attn.k_norm.weight"] = norm_weight(spec.head_dim)
        for name, (rows, cols) in _linear_shapes(spec).items():
            weight = normal(rows, cols, std=cols**-0.5)
            if scheme == "fp8-block":
                q, scale_inv = quantize_fp8_block(weight, (FP8_BLOCK, FP8_BLOCK))
                out[f"{prefix}.{name}.weight"] = q
                out[f"{prefix}.{name}.weight_scale_inv"] = scale_inv
            else:
                out[f"{prefix}.{name}.weight"] = weight.to(torch.bfloat16)
    out["model.norm.weight"] = norm_weight(h)
    out["lm_head.weight"] = normal(spec.vocab_size, h, std=h**-0.5).to(torch.bfloat16)
    return out


def _config(spec: DemoSpec, scheme: str) -> dict[str, object]:
    config: dict[str, object] = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 256,
        "eos_token_id": 258,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "sliding_window": None,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        **asdict(spec),
    }
    if scheme == "fp8-block":
        config["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
        }
    return config


def write_demo_model(
    out: Path, scheme: str = "bf16", seed: int = 0, spec: DemoSpec | None = None
) -> Path:
    """Write a loadable checkpoint (weights, config, tokenizer, chat template) into `out`."""
    if scheme not in SCHEMES:
        raise UsageError(
            f"Demo scheme '{scheme}' is not known. Use one of: {', '.join(SCHEMES)}."
        )
    spec = spec or DemoSpec()
    out.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(spec, scheme, seed), str(out / "model.safetensors"), {"format": "pt"})
    config = _config(spec, scheme)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = {"bos_token_id": 256, "eos_token_id": 258, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer(out, spec.max_position_embeddings)
    return out
