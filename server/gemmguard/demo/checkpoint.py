"""Tiny Qwen3 and Qwen3-MoE checkpoints, byte-identical for the same seed.

Every GEMM dimension is a multiple of 128 so that 128×128 block quantization (and 128-column
int4 groups) apply without padding, which is the shape real quantized checkpoints have.
Schemes: bf16; fp8-block (vLLM's `fp8` format, 128×128 `weight_scale_inv`); w4a16-g128,
w4a8-g128 and nvfp4 (compressed-tensors, written by its own compressors).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from gemmguard.demo import compressed
from gemmguard.demo.tokenizer import SPECIAL_TOKENS, write_tokenizer
from gemmguard.errors import UsageError
from gemmguard.numerics import quantize_fp8_block

SCHEMES = ("bf16", "fp8-block", *compressed.PRESETS)
ARCHITECTURES = ("qwen3", "qwen3-moe")
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
    # Qwen3-MoE only: routed experts in every layer, no shared expert.
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 256

    def __post_init__(self) -> None:
        sizes = {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
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
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise UsageError(f"Demo num_experts_per_tok {self.num_experts_per_tok} must be "
                             f"between 1 and num_experts ({self.num_experts}).")

    def config_fields(self, arch: str) -> dict[str, object]:
        """The spec's config.json fields (the dense model has no MoE fields)."""
        fields = asdict(self)
        if arch == "qwen3":
            for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
                del fields[name]
        return fields


def _linear_shapes(spec: DemoSpec) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer in one dense decoder layer."""
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


def _expert_shapes(spec: DemoSpec) -> dict[str, tuple[int, int]]:
    h, i = spec.hidden_size, spec.moe_intermediate_size
    return {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


# Weights vLLM fuses into one GEMM (they share NVFP4 global scales).
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _encode(out: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], scheme: str) -> None:
    """Store linear weights by name in the scheme's on-disk tensors."""
    for name, weight in weights.items():
        if scheme == "fp8-block":
            q, scale_inv = quantize_fp8_block(weight, (FP8_BLOCK, FP8_BLOCK))
            out[f"{name}.weight"] = q
            out[f"{name}.weight_scale_inv"] = scale_inv
        elif scheme in compressed.PRESETS:
            base, _, leaf = name.rpartition(".")
            group = next((g for g in FUSED if leaf in g), (leaf,))
            fused = [weights[f"{base}.{other}"] for other in group
                     if other != leaf and f"{base}.{other}" in weights]
            for suffix, tensor in compressed.compress(weight, scheme, fused).items():
                out[f"{name}.{suffix}"] = tensor
        else:
            out[f"{name}.weight"] = weight.to(torch.bfloat16)


def stressed(weight: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """`weight` with what makes quantized GEMMs hard: outlier input channels and extreme scales.

    Two input channels ×16 (the channels real models' massive activations meet), one 128-row
    block ×2^-6 and one ×2^3 (the smallest and largest scales a block or group can have).
    """
    rows, cols = weight.shape
    weight = weight.clone()
    weight[:, torch.randperm(cols, generator=gen)[:2]] *= 16.0
    blocks = rows // FP8_BLOCK
    if blocks >= 2:
        small, large = torch.randperm(blocks, generator=gen)[:2].tolist()
        weight[small * FP8_BLOCK:(small + 1) * FP8_BLOCK] *= 2.0 ** -6
        weight[large * FP8_BLOCK:(large + 1) * FP8_BLOCK] *= 2.0 ** 3
    return weight


def _tensors(spec: DemoSpec, scheme: str, seed: int, arch: str,
             stress: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        values = torch.randn(*shape, generator=gen, dtype=torch.float32) * std
        return stressed(values, gen) if stress and len(shape) == 2 else values

    def norm_weight(n: int) -> torch.Tensor:
        return (1.0 + normal(n, std=0.05)).to(torch.bfloat16)

    h = spec.hidden_size
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight":
            torch.randn(spec.vocab_size, h, generator=gen).mul(0.5).to(torch.bfloat16),
    }
    for layer in range(spec.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        out[f"{prefix}.input_layernorm.weight"] = norm_weight(h)
        out[f"{prefix}.post_attention_layernorm.weight"] = norm_weight(h)
        out[f"{prefix}.self_attn.q_norm.weight"] = norm_weight(spec.head_dim)
        out[f"{prefix}.self_attn.k_norm.weight"] = norm_weight(spec.head_dim)
        weights = {f"{prefix}.{name}": normal(rows, cols, std=cols**-0.5)
                   for name, (rows, cols) in _linear_shapes(spec).items()
                   if arch == "qwen3" or not name.startswith("mlp.")}
        _encode(out, weights, scheme)
        if arch == "qwen3-moe":
            # The router stays bf16 (listed as not quantized), as in real quantized MoE models.
            out[f"{prefix}.mlp.gate.weight"] = \
                normal(spec.num_experts, h, std=h**-0.5).to(torch.bfloat16)
            for expert in range(spec.num_experts):
                # Experts' magnitudes spread over 2^-3..2^3, so that the smallest- and
                # largest-scale experts the self-check samples are far apart.
                gain = 2.0 ** (expert % 7 - 3)
                _encode(out, {f"{prefix}.mlp.experts.{expert}.{name}":
                              normal(rows, cols, std=cols**-0.5) * gain
                              for name, (rows, cols) in _expert_shapes(spec).items()}, scheme)
    out["model.norm.weight"] = norm_weight(h)
    out["lm_head.weight"] = normal(spec.vocab_size, h, std=h**-0.5).to(torch.bfloat16)
    return out


def _not_quantized(spec: DemoSpec, arch: str) -> list[str]:
    """Full names of the GEMMs left in bf16: lm_head and, in MoE models, the routers."""
    routers = [f"model.layers.{layer}.mlp.gate" for layer in range(spec.num_hidden_layers)]
    return ["lm_head", *(routers if arch == "qwen3-moe" else [])]


def _config(spec: DemoSpec, scheme: str, arch: str = "qwen3") -> dict[str, object]:
    moe = arch == "qwen3-moe"
    config: dict[str, object] = {
        "architectures": ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if moe else "qwen3",
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
        **spec.config_fields(arch),
    }
    if moe:
        config.update({
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": True,
            "output_router_logits": False,
            "router_aux_loss_coef": 0.001,
        })
    if scheme == "fp8-block":
        quantization: dict[str, object] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
        }
        if moe:
            quantization["ignored_layers"] = _not_quantized(spec, arch)[1:]
        config["quantization_config"] = quantization
    elif scheme in compressed.PRESETS:
        config["quantization_config"] = compressed.quantization_config(
            scheme, _not_quantized(spec, arch))
    return config


def write_demo_model(
    out: Path, scheme: str = "bf16", seed: int = 0, spec: DemoSpec | None = None,
    arch: str = "qwen3", stress: bool = False,
) -> Path:
    """Write a loadable checkpoint (weights, config, tokenizer, chat template) into `out`.

    `stress`: weights with outlier input channels and extreme-scale blocks (`stressed`), the
    checkpoints kernels are recorded on.
    """
    if scheme not in SCHEMES:
        raise UsageError(
            f"Demo scheme '{scheme}' is not known. Use one of: {', '.join(SCHEMES)}."
        )
    if arch not in ARCHITECTURES:
        raise UsageError(
            f"Demo architecture '{arch}' is not known. Use one of: {', '.join(ARCHITECTURES)}."
        )
    spec = spec or DemoSpec()
    out.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(spec, scheme, seed, arch, stress), str(out / "model.safetensors"),
              {"format": "pt"})
    config = _config(spec, scheme, arch)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = {"bos_token_id": 256, "eos_token_id": 258, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer(out, spec.max_position_embeddings)
    return out
