"""Fix 5 on a simulated Ampere: Marlin takes FP8 block layers and is built with its arguments."""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from gemmguard.fixes import marlin_fp8_block
from gemmguard.vllm_adapter import fixes as engine
from helpers import simulate

ISSUBCLASS = "issubclass(kernel_type, FP8ScaledMMLinearKernel)"


@pytest.fixture
def ampere(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    simulate.clear_caches()
    yield simulate.cuda(monkeypatch, 80)
    simulate.clear_caches()


@pytest.fixture
def vllm_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """A default VllmConfig as the current one: kernels build CustomOps, which read it."""
    import vllm.config.vllm as config_module

    monkeypatch.setattr(config_module, "_current_vllm_config", config_module.VllmConfig())


def build_fp8_block_kernel() -> Any:
    """What Fp8LinearMethod.create_weights does for a 128×128-block FP8 layer."""
    weight_key, activation_key = engine.fp8_moe_keys()
    config = engine.fp8_block_config()
    return engine.init_fp8_linear_kernel()(
        activation_key, weight_key, config.input_dtype, config.out_dtype, config.weight_shape
    )


def factory_with(monkeypatch: pytest.MonkeyPatch, condition: str) -> None:
    """vLLM's kernel factory rebuilt from its source with the constructor branch replaced."""
    module = engine.vllm_adapter.linear_kernels_module()
    fn = module.init_fp8_linear_kernel
    source = textwrap.dedent(inspect.getsource(fn)).replace(ISSUBCLASS, condition)
    namespace: dict[str, Any] = {}
    exec(compile(source, "<pre-fix factory>", "exec"), fn.__globals__, namespace)
    monkeypatch.setattr(module, "init_fp8_linear_kernel", namespace[fn.__name__])


def test_applies_below_hopper_only(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not marlin_fp8_block.FIX.applies()  # this CPU box
    simulate.cuda(monkeypatch, 80)
    assert marlin_fp8_block.FIX.applies()
    simulate.cuda(monkeypatch, 90)
    assert not marlin_fp8_block.FIX.applies()


def test_marlin_is_chosen_and_built_on_ampere(ampere: Any, vllm_config: None) -> None:
    kernel = build_fp8_block_kernel()
    assert type(kernel).__name__ == "MarlinFP8ScaledMMLinearKernel"
    assert list(kernel.layer_param_names) == ["weight", "weight_scale", "input_scale",
                                              "input_scale_ub"]
    assert marlin_fp8_block.detect().state == "upstream"


def test_without_marlin_in_the_list_ampere_gets_another_kernel_and_detect_says_so(
    ampere: Any, vllm_config: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    lists = engine.vllm_adapter.candidate_lists("fp8_block")
    cuda = engine.platform_enum("CUDA")
    without = [k for k in lists[cuda] if k.__name__ != "MarlinFP8ScaledMMLinearKernel"]
    monkeypatch.setitem(lists, cuda, without)
    # 0.32 lists Triton after Marlin (Ampere has no FP8 tensor cores); before seed fix 004
    # (issue 4) nothing fit and the checkpoint failed to load.
    try:
        assert type(build_fp8_block_kernel()).__name__ != "MarlinFP8ScaledMMLinearKernel"
    except ValueError as exc:
        assert "Failed to find a kernel" in str(exc)
    finding = marlin_fp8_block.detect()
    assert finding.missing_parts == ("candidate",)
    assert "not among the CUDA FP8 block candidates" in finding.detail


@pytest.mark.parametrize("condition", ["False", "kernel_type is MarlinFP8ScaledMMLinearKernel"])
def test_a_constructor_branch_that_ignores_the_base_class_is_caught(
    ampere: Any, vllm_config: None, monkeypatch: pytest.MonkeyPatch, condition: str
) -> None:
    factory_with(monkeypatch, condition)
    if condition == "False":  # before seed fix 004: every block kernel built as kernel(config)
        with pytest.raises(TypeError, match="layer_param_names"):
            build_fp8_block_kernel()
    finding = marlin_fp8_block.detect()
    assert finding.missing_parts == ("constructor",)
    assert "building a Marlin subclass fails" in finding.detail
