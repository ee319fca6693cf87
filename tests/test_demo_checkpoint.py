"""Demo checkpoints: deterministic, loadable by transformers, and really FP8 block-scaled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gemmguard.demo import DemoSpec, write_demo_model
from gemmguard.demo.checkpoint import FP8_BLOCK
from gemmguard.errors import UsageError
from gemmguard.numerics import quantize_fp8_block


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("scheme", ["bf16", "fp8-block"])
def test_same_seed_gives_byte_identical_files(tmp_path: Path, scheme: str) -> None:
    first = _files(write_demo_model(tmp_path / "a", scheme, seed=7))
    second = _files(write_demo_model(tmp_path / "b", scheme, seed=7))
    other = _files(write_demo_model(tmp_path / "c", scheme, seed=8))
    assert first == second
    assert first["model.safetensors"] != other["model.safetensors"]


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
