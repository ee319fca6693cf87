"""Demo checkpoints: deterministic, loadable by transformers, and really in their formats."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from gemmguard.demo import DemoSpec, write_demo_model
from gemmguard.demo.checkpoint import FP8_BLOCK
from gemmguard.demo.store import DEMO_REVISION
from gemmguard.errors import UsageError
from gemmguard.numerics import quantize_fp8_block


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(("arch", "scheme"), [
    ("qwen3", "bf16"), ("qwen3", "fp8-block"), ("qwen3", "w4a16-g128"), ("qwen3", "nvfp4"),
    ("qwen3", "w4a8-g128"), ("qwen3", "w4a8-int8-g128"), ("qwen3-moe", "bf16"),
    ("qwen3-moe", "fp8-block"), ("qwen3-moe", "w4a16-g128"),
])
def test_same_seed_gives_byte_identical_files(tmp_path: Path, arch: str, scheme: str) -> None:
    first = _files(write_demo_model(tmp_path / "a", scheme, seed=7, arch=arch))
    second = _files(write_demo_model(tmp_path / "b", scheme, seed=7, arch=arch))
    other = _files(write_demo_model(tmp_path / "c", scheme, seed=8, arch=arch))
    assert first == second
    assert first["model.safetensors"] != other["model.safetensors"]


# The embedded default demo (fp8-block, seed 0) as revision v1 wrote it. Caches of it are
# reused by revision name, so its bytes may change only together with DEMO_REVISION.
DEFAULT_DEMO_SHA256 = {
    "v1": {"model.safetensors": "d74a5fe25371b907eba943177d5319265fddb11f7b72a7ad659efdc5d75ca507",
           "config.json": "9ef37cca9d4fa643bae037ddbbb126318bd7b225a0488ca6c9abfb1546a583de"},
}


def test_the_default_demo_changes_only_with_its_revision(tmp_path: Path) -> None:
    files = _files(write_demo_model(tmp_path / "m", "fp8-block"))
    expected = DEFAULT_DEMO_SHA256.get(DEMO_REVISION)
    assert expected is not None, f"record the hashes of demo revision {DEMO_REVISION} here"
    assert {name: hashlib.sha256(files[name]).hexdigest() for name in expected} == expected


def test_cli_writes_the_same_bytes_as_the_library(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "gemmguard.cli", "demo-model", "--scheme", "fp8-block",
         "--out", str(tmp_path / "cli")],
        check=True,
    )
    assert _files(tmp_path / "cli") == _files(write_demo_model(tmp_path / "lib", "fp8-block"))


def test_transformers_loads_the_bf16_checkpoint_and_its_chat_template(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = write_demo_model(tmp_path / "m", "bf16")
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer("héllo")["input_ids"]
    assert tokenizer.decode(ids) == "héllo"
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), DemoSpec().vocab_size)
    assert torch.isfinite(logits).all()


def test_fp8_block_layout_and_quantization_config(tmp_path: Path) -> None:
    out = write_demo_model(tmp_path / "m", "fp8-block")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    tensors = load_file(str(out / "model.safetensors"))
    weight = tensors["model.layers.0.mlp.down_proj.weight"]
    scale = tensors["model.layers.0.mlp.down_proj.weight_scale_inv"]
    assert weight.dtype == torch.float8_e4m3fn
    assert scale.dtype == torch.float32
    assert scale.shape == (weight.shape[0] // FP8_BLOCK, weight.shape[1] // FP8_BLOCK)
    # Norms, embeddings and lm_head stay bf16, as in real FP8 checkpoints.
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    assert "lm_head.weight_scale_inv" not in tensors


def test_quantize_fp8_block_round_trips_within_e4m3_precision() -> None:
    weight = torch.randn(256, 384, generator=torch.Generator().manual_seed(0))
    weight[0, 0] = 40.0  # one outlier must only coarsen its own block
    q, scale_inv = quantize_fp8_block(weight)
    deq = q.float() * scale_inv.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
    rel = (deq - weight).norm() / weight.norm()
    assert rel < 0.05  # e4m3 keeps 3 mantissa bits: ~2-4% relative error
    assert scale_inv[0, 0] > 5 * scale_inv[1, 1]


def test_spec_rejects_dimensions_that_block_quantization_cannot_use() -> None:
    with pytest.raises(UsageError, match="multiple of 128"):
        DemoSpec(hidden_size=200)


def test_unknown_scheme_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="int3"):
        write_demo_model(tmp_path, "int3")


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def test_qwen3_moe_config_and_expert_layout(tmp_path: Path) -> None:
    from transformers import AutoConfig

    spec = DemoSpec()
    out = write_demo_model(tmp_path / "m", "bf16", arch="qwen3-moe")
    config = AutoConfig.from_pretrained(out)
    assert type(config).__name__ == "Qwen3MoeConfig"
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == \
        (8, 2, 256)
    assert config.norm_topk_prob is True and config.mlp_only_layers == []
    tensors = _tensors(out)
    assert not any(".mlp.gate_proj." in name for name in tensors)  # no dense MLP
    assert tensors["model.layers.1.mlp.gate.weight"].shape == (spec.num_experts, spec.hidden_size)
    down = tensors["model.layers.0.mlp.experts.7.down_proj.weight"]
    assert down.shape == (spec.hidden_size, spec.moe_intermediate_size)
    # Experts' magnitudes are spread, so the self-check's extreme experts are far apart.
    small = tensors["model.layers.0.mlp.experts.0.up_proj.weight"].float().abs().mean()
    large = tensors["model.layers.0.mlp.experts.6.up_proj.weight"].float().abs().mean()
    assert large > 30 * small


def test_transformers_runs_the_moe_checkpoint(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(write_demo_model(tmp_path / "m", "bf16",
                                                                  arch="qwen3-moe"))
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    logits = model(torch.tensor([[256, 72, 105]])).logits
    assert logits.shape == (1, 3, DemoSpec().vocab_size)
    assert torch.isfinite(logits).all()


def test_fp8_block_moe_keeps_the_routers_bf16_and_says_so(tmp_path: Path) -> None:
    out = write_demo_model(tmp_path / "m", "fp8-block", arch="qwen3-moe")
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["ignored_layers"] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    tensors = _tensors(out)
    assert tensors["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.mlp.experts.3.gate_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.0.mlp.experts.3.gate_proj.weight_scale_inv"].shape == (2, 2)


def _vllm_scheme(config: dict[str, Any], layer: str) -> Any:
    """The scheme vLLM's compressed-tensors loader reads from this config for `layer`."""
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    quant = CompressedTensorsConfig.from_config(config["quantization_config"])
    return quant.get_scheme_dict(torch.nn.Linear(1, 1), layer)


@pytest.mark.parametrize("arch", ["qwen3", "qwen3-moe"])
def test_w4a16_is_compressed_tensors_pack_quantized_group_128(tmp_path: Path, arch: str) -> None:
    out = write_demo_model(tmp_path / "m", "w4a16-g128", arch=arch)
    config = json.loads((out / "config.json").read_text())
    quant = config["quantization_config"]
    assert (quant["quant_method"], quant["format"], quant["quantization_status"]) == \
        ("compressed-tensors", "pack-quantized", "compressed")
    weights = quant["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"],
            weights["strategy"], weights["type"]) == (4, 128, True, "group", "int")
    layer = "model.layers.0.self_attn.q_proj"
    scheme = _vllm_scheme(config, layer)
    assert scheme["weights"].num_bits == 4 and scheme["input_activations"] is None
    assert _vllm_scheme(config, "lm_head") is None
    tensors = _tensors(out)
    rows, cols = 256, 256
    assert tensors[f"{layer}.weight_packed"].shape == (rows, cols // 8)
    assert tensors[f"{layer}.weight_packed"].dtype == torch.int32
    assert tensors[f"{layer}.weight_scale"].shape == (rows, cols // 128)
    assert tensors[f"{layer}.weight_scale"].dtype == torch.bfloat16
    assert tensors[f"{layer}.weight_shape"].tolist() == [rows, cols]
    if arch == "qwen3-moe":
        assert quant["ignore"] == ["lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
        expert = "model.layers.1.mlp.experts.5.down_proj"
        assert tensors[f"{expert}.weight_packed"].shape == (256, 256 // 8)


def test_w4a16_decompresses_to_the_weights_it_quantized(tmp_path: Path) -> None:
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    bf16 = _tensors(write_demo_model(tmp_path / "bf16", "bf16"))
    w4 = _tensors(write_demo_model(tmp_path / "w4", "w4a16-g128"))
    name = "model.layers.1.mlp.down_proj"
    state = {k.removeprefix(f"{name}."): v for k, v in w4.items() if k.startswith(f"{name}.")}
    weight = PackedQuantizationCompressor.decompress(
        state, preset_name_to_scheme("W4A16", ["Linear"]))["weight"].float()
    original = bf16[f"{name}.weight"].float()
    rel = (weight - original).norm() / original.norm()
    assert 0.02 < rel < 0.2  # int4 with 128-column groups: about 10% relative error


def test_nvfp4_shares_global_scales_across_fused_weights(tmp_path: Path) -> None:
    out = write_demo_model(tmp_path / "m", "nvfp4", arch="qwen3-moe")
    config = json.loads((out / "config.json").read_text())
    scheme = _vllm_scheme(config, "model.layers.0.self_attn.k_proj")
    assert scheme["weights"].group_size == 16 and scheme["input_activations"] is not None
    tensors = _tensors(out)
    attn = "model.layers.0.self_attn"
    q, k, v = (tensors[f"{attn}.{p}_proj.weight_global_scale"] for p in "qkv")
    assert torch.equal(q, k) and torch.equal(q, v)
    expert = "model.layers.0.mlp.experts.4"
    assert torch.equal(tensors[f"{expert}.gate_proj.weight_global_scale"],
                       tensors[f"{expert}.up_proj.weight_global_scale"])
    assert tensors[f"{expert}.gate_proj.weight_packed"].shape == (256, 128)
    assert tensors[f"{expert}.gate_proj.weight_scale"].dtype == torch.float8_e4m3fn
    assert tensors[f"{expert}.gate_proj.input_global_scale"].dtype == torch.float32


def test_w4a8_is_int4_groups_with_dynamic_fp8_token_activations(tmp_path: Path) -> None:
    out = write_demo_model(tmp_path / "m", "w4a8-g128")
    config = json.loads((out / "config.json").read_text())
    group = config["quantization_config"]["config_groups"]["group_0"]
    assert (group["weights"]["num_bits"], group["weights"]["group_size"]) == (4, 128)
    acts = group["input_activations"]
    assert (acts["type"], acts["num_bits"], acts["strategy"], acts["dynamic"]) == \
        ("float", 8, "token", True)


@pytest.mark.parametrize("arch", ["qwen3", "qwen3-moe"])
def test_w4a8_int8_stores_int4_codes_one_per_int8(tmp_path: Path, arch: str) -> None:
    out = write_demo_model(tmp_path / "m", "w4a8-int8-g128", arch=arch)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "int-quantized"
    acts = config["quantization_config"]["config_groups"]["group_0"]["input_activations"]
    assert (acts["type"], acts["num_bits"], acts["strategy"]) == ("int", 8, "token")
    name = "model.layers.0.mlp.experts.1.up_proj" if arch == "qwen3-moe" \
        else "model.layers.0.mlp.up_proj"
    tensors = _tensors(out)
    codes = tensors[f"{name}.weight"]
    assert codes.dtype == torch.int8 and -8 <= int(codes.min()) and int(codes.max()) <= 7
    assert tensors[f"{name}.weight_scale"].shape == (codes.shape[0], codes.shape[1] // 128)


def test_unknown_architecture_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="llama"):
        write_demo_model(tmp_path, "bf16", arch="llama")


def test_cli_writes_the_moe_demo(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "gemmguard.cli", "demo-model", "--arch", "qwen3-moe",
         "--scheme", "w4a16-g128", "--experts", "4", "--top-k", "1", "--layers", "1",
         "--out", str(tmp_path / "cli")],
        check=True,
    )
    spec = DemoSpec(num_hidden_layers=1, num_experts=4, num_experts_per_tok=1)
    assert _files(tmp_path / "cli") == _files(
        write_demo_model(tmp_path / "lib", "w4a16-g128", spec=spec, arch="qwen3-moe"))


@pytest.mark.parametrize(("scheme", "preset", "compressor", "low", "high"), [
    # int8 in 128-column groups: about 0.3 % relative error; MXFP4 in 32-column E8M0 blocks: ~15 %.
    ("w8a16-g128", "W8A16", "PackedQuantizationCompressor", 0.001, 0.02),
    ("mxfp4a16", "MXFP4A16", "MXFP4PackedCompressor", 0.05, 0.3),
    ("w8a8-int8", "W8A8", "IntQuantizationCompressor", 0.001, 0.03),
    ("fp8-dynamic", "FP8_DYNAMIC", "FloatQuantizationCompressor", 0.005, 0.06),
])
def test_weight_formats_decompress_to_the_weights_they_quantized(
        tmp_path: Path, scheme: str, preset: str, compressor: str, low: float,
        high: float) -> None:
    """The schemes recorded for the calibration are written by compressed-tensors' own code:
    its decompressor reads back the demo's weights within the format's precision."""
    import compressed_tensors.compressors as compressors
    from compressed_tensors.quantization import preset_name_to_scheme

    bf16 = _tensors(write_demo_model(tmp_path / "bf16", "bf16"))
    quantized = _tensors(write_demo_model(tmp_path / scheme, scheme))
    name = "model.layers.1.mlp.down_proj"
    state = {k.removeprefix(f"{name}."): v for k, v in quantized.items()
             if k.startswith(f"{name}.")}
    weight = getattr(compressors, compressor).decompress(
        state, preset_name_to_scheme(preset, ["Linear"]))["weight"].float()
    original = bf16[f"{name}.weight"].float()
    rel = (weight - original).norm() / original.norm()
    assert low < rel < high, rel
