"""Large random FP8 block-scaled checkpoints for the GPU runs, made on the GPU in seconds.

    python scripts/gpu_checkpoints.py llama8b OUT_DIR      # Llama-3-8B shapes, 32 layers
    python scripts/gpu_checkpoints.py qwen3moe OUT_DIR [--layers N --experts E --top-k K]

Nothing can be downloaded on the lent machines, so the weights are random (normal, scaled by
fan-in) and the tokenizer is gemmguard's byte-level demo tokenizer. Every GEMM dimension is a
multiple of 128 so 128×128 blocks apply.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from gemmguard.demo.tokenizer import write_tokenizer
from gemmguard.numerics import quantize_fp8_block

BLOCK = 128


UNQUANTIZED = [False]
# Write the routers' exclusion as a bare "gate", which vLLM's Fp8Config (exact match on full
# names) does not apply: the mismatch the H200 run of 2026-11-30 found (docs/vllm-0.26-contract.md).
ROUTER_EXCLUSION_BY_SHORT_NAME = [False]


def _fp8(out: dict[str, torch.Tensor], name: str, rows: int, cols: int,
         gen: torch.Generator, device: str, gain: float = 1.0) -> None:
    weight = torch.randn(rows, cols, generator=gen, device=device) * cols ** -0.5 * gain
    if UNQUANTIZED[0]:
        out[f"{name}.weight"] = weight.bfloat16().cpu()
        return
    q, scale = quantize_fp8_block(weight, (BLOCK, BLOCK))
    out[f"{name}.weight"] = q.cpu()
    out[f"{name}.weight_scale_inv"] = scale.cpu()


def _bf16(n: int, gen: torch.Generator, device: str, std: float = 0.05) -> torch.Tensor:
    return (1.0 + torch.randn(n, generator=gen, device=device) * std).bfloat16().cpu()


def make(kind: str, out: Path, layers: int, experts: int, top_k: int) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    if kind == "llama8b":
        h, inter, heads, kv, head_dim, vocab = 4096, 14336, 32, 8, 128, 128256
        config: dict[str, object] = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                     "intermediate_size": inter, "rope_theta": 500000.0}
    else:
        h, inter, heads, kv, head_dim, vocab = 1024, 512, 16, 4, 64, 384
        config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                  "intermediate_size": 3072, "moe_intermediate_size": inter,
                  "num_experts": experts, "num_experts_per_tok": top_k, "norm_topk_prob": True,
                  "decoder_sparse_step": 1, "mlp_only_layers": [], "head_dim": head_dim,
                  "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
                  "output_router_logits": False}
    config.update({
        "hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "bos_token_id": 256, "eos_token_id": 258,
        "attention_bias": False,
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                "activation_scheme": "dynamic",
                                "weight_block_size": [BLOCK, BLOCK]},
    })
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight":
            (torch.randn(vocab, h, generator=gen, device=device) * 0.5).bfloat16().cpu(),
        "lm_head.weight":
            (torch.randn(vocab, h, generator=gen, device=device) * h ** -0.5).bfloat16().cpu(),
        "model.norm.weight": _bf16(h, gen, device),
    }
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors[f"{p}.input_layernorm.weight"] = _bf16(h, gen, device)
        tensors[f"{p}.post_attention_layernorm.weight"] = _bf16(h, gen, device)
        _fp8(tensors, f"{p}.self_attn.q_proj", heads * head_dim, h, gen, device)
        _fp8(tensors, f"{p}.self_attn.k_proj", kv * head_dim, h, gen, device)
        _fp8(tensors, f"{p}.self_attn.v_proj", kv * head_dim, h, gen, device)
        _fp8(tensors, f"{p}.self_attn.o_proj", h, heads * head_dim, gen, device)
        if kind == "llama8b":
            for name, rows, cols in (("gate_proj", inter, h), ("up_proj", inter, h),
                                     ("down_proj", h, inter)):
                _fp8(tensors, f"{p}.mlp.{name}", rows, cols, gen, device)
            continue
        tensors[f"{p}.self_attn.q_norm.weight"] = _bf16(head_dim, gen, device)
        tensors[f"{p}.self_attn.k_norm.weight"] = _bf16(head_dim, gen, device)
        # The router stays bf16, as in real Qwen3-MoE FP8 checkpoints.
        tensors[f"{p}.mlp.gate.weight"] = \
            (torch.randn(experts, h, generator=gen, device=device) * h ** -0.5).bfloat16().cpu()
        for e in range(experts):
            # Spread the experts' magnitudes, so the smallest and largest scales differ a lot.
            gain = 2.0 ** ((e % 7) - 3)
            for name, rows, cols in (("gate_proj", inter, h), ("up_proj", inter, h),
                                     ("down_proj", h, inter)):
                _fp8(tensors, f"{p}.mlp.experts.{e}.{name}", rows, cols, gen, device, gain)
    if UNQUANTIZED[0]:
        del config["quantization_config"]
    elif kind != "llama8b":
        # vLLM matches these names exactly (Fp8Config's "exact" mode): full module names.
        routers = ["gate"] if ROUTER_EXCLUSION_BY_SHORT_NAME[0] else \
            [f"model.layers.{i}.mlp.gate" for i in range(layers)]
        config["quantization_config"]["modules_to_not_convert"] = routers  # type: ignore[index]
    save_file(tensors, str(out / "model.safetensors"), {"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(out, 4096)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("llama8b", "qwen3moe"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--bf16", action="store_true", help="Unquantized (for CPU runs).")
    parser.add_argument("--router-excluded-by-short-name", action="store_true",
                        help="qwen3moe: exclude the bf16 routers as 'gate', which vLLM does not "
                             "match: a checkpoint whose weights do not match its config.")
    args = parser.parse_args()
    UNQUANTIZED[0] = args.bf16
    ROUTER_EXCLUSION_BY_SHORT_NAME[0] = args.router_excluded_by_short_name
    layers = args.layers or (32 if args.kind == "llama8b" else 2)
    make(args.kind, args.out, layers, args.experts, args.top_k)


if __name__ == "__main__":
    main()
