"""Fix 3 on a simulated MI355 (gfx950): Quark MXFP4, the AITER tgemm gate and its size guard."""

from __future__ import annotations

import inspect
import textwrap
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from gemmguard import ledger
from gemmguard.config import Settings
from gemmguard.fixes import Changes, Finding, rocm_gfx950
from gemmguard.vllm_adapter import fixes as engine
from helpers import simulate

HUGE = (1 << 16, 1 << 15, 64)  # n, m, k: 2**31 outputs


@pytest.fixture(autouse=True)
def restore(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger, "_APPLIED", {})
    quark = engine.quark_config_class()
    monkeypatch.setattr(quark, "maybe_update_config", quark.maybe_update_config)
    ops = engine.aiter_ops_module().rocm_aiter_ops
    monkeypatch.setattr(ops, "is_tgemm_enabled", ops.__dict__["is_tgemm_enabled"])
    utils = engine.layers_utils()
    monkeypatch.setattr(utils, "rocm_unquantized_gemm", utils.rocm_unquantized_gemm)


def gfx950(monkeypatch: pytest.MonkeyPatch, aiter_installed: bool) -> Iterator[Any]:
    ops = engine.aiter_ops_module().rocm_aiter_ops
    monkeypatch.setattr(ops, "_AITER_ENABLED", True)  # VLLM_ROCM_USE_AITER=1
    monkeypatch.setattr(ops, "_LINEAR_ENABLED", True)  # VLLM_ROCM_USE_AITER_LINEAR=1 (default)
    yield simulate.rocm_gfx950(monkeypatch, aiter_installed)


@pytest.fixture
def with_aiter(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    yield from gfx950(monkeypatch, aiter_installed=True)


@pytest.fixture
def without_aiter(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    yield from gfx950(monkeypatch, aiter_installed=False)


def test_applies_only_on_gfx950(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not rocm_gfx950.FIX.applies()  # this CPU box
    for _ in gfx950(monkeypatch, aiter_installed=False):
        assert rocm_gfx950.FIX.applies()


def deepseek_v3_quark() -> Any:
    quant = {"global_quant_config": {"weight": {"dtype": "fp4"}}, "exclude": ["*self_attn*"]}
    config = engine.quark_config_class()(quant_config=quant)
    hf = types.SimpleNamespace(model_type="deepseek_v3", quantization_config=quant)
    config.maybe_update_config("deepseek-ai/DeepSeek-R1-MXFP4", hf_config=hf)
    return config


def test_dynamic_mxfp4_stays_off_and_the_0_26_form_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert not getattr(deepseek_v3_quark(), "dynamic_mxfp4_quant", False)
    assert rocm_gfx950.mxfp4_ok()[0]

    def maybe_update_config(self: Any, model_name: str, hf_config: Any = None, revision: Any = None
                            ) -> None:  # vLLM 0.26's form: on for DeepSeek-V3 fp4 checkpoints
        weight = hf_config.quantization_config["global_quant_config"]["weight"]
        if hf_config.model_type == "deepseek_v3" and weight["dtype"] == "fp4":
            self.dynamic_mxfp4_quant = True

    monkeypatch.setattr(engine.quark_config_class(), "maybe_update_config", maybe_update_config)
    assert deepseek_v3_quark().dynamic_mxfp4_quant
    ok, text = rocm_gfx950.mxfp4_ok()
    assert not ok and "dynamic MXFP4" in text
    assert "mxfp4" in rocm_gfx950.detect().missing_parts
    rocm_gfx950.patch(Settings({}), Finding("missing", text, ("mxfp4",)), Changes())
    assert not deepseek_v3_quark().dynamic_mxfp4_quant


def test_tgemm_follows_the_aiter_linear_setting_on_gfx950(
    with_aiter: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = engine.aiter_ops_module().rocm_aiter_ops
    assert ops.is_tgemm_enabled()
    monkeypatch.setattr(ops, "_LINEAR_ENABLED", False)
    assert not ops.is_tgemm_enabled()
    assert rocm_gfx950.gate_ok() == (True, "tgemm gated (AITER usable here: True)")


def ungated(cls: Any) -> bool:
    """A tgemm switch without the AITER-installed check (the crash the seed fix prevents)."""
    from vllm.platforms.rocm import on_gfx950

    return bool(cls._AITER_ENABLED and cls._LINEAR_ENABLED and on_gfx950())


def test_tgemm_enabled_without_aiter_stays_off_and_an_ungated_form_is_caught(
    without_aiter: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = engine.aiter_ops_module().rocm_aiter_ops
    assert not ops.is_tgemm_enabled()  # no AITER: the GEMM never imports aiter.tuned_gemm
    assert rocm_gfx950.gate_ok()[0]
    monkeypatch.setattr(ops, "is_tgemm_enabled", classmethod(ungated))
    assert ops.is_tgemm_enabled()
    ok, text = rocm_gfx950.gate_ok()
    assert not ok and "usable=False" in text
    assert "gate" in rocm_gfx950.detect().missing_parts
    rocm_gfx950.patch(Settings({}), Finding("missing", text, ("gate",)), Changes())
    assert not ops.is_tgemm_enabled()


def guarded_impl() -> Any:
    """vLLM's ROCm GEMM with 0.33's size guard, built from the installed source if it lacks one."""
    impl = engine.layers_utils().rocm_unquantized_gemm_impl
    source = textwrap.dedent(inspect.getsource(impl))
    guard = ("rocm_aiter_ops.is_tgemm_enabled() and not (n * m >= 1 << 31 or "
             "max(n, m) * k * x.element_size() >= 1 << 32)")
    source = source.replace("rocm_aiter_ops.is_tgemm_enabled()", guard, 1)
    namespace: dict[str, Any] = {}
    exec(compile(source, "<0.33 form>", "exec"), impl.__globals__, namespace)
    return namespace[impl.__name__]


def test_size_guard_probe_tells_guarded_from_unguarded(monkeypatch: pytest.MonkeyPatch) -> None:
    utils = engine.layers_utils()
    has_guard = "aiter_hgemm_unsafe" in inspect.getsource(utils.rocm_unquantized_gemm_impl)
    assert rocm_gfx950.guard_ok()[0] == has_guard  # 0.32: missing; 0.33: present
    assert ("guard" in rocm_gfx950.detect().missing_parts) is not has_guard
    monkeypatch.setattr(utils, "rocm_unquantized_gemm_impl", guarded_impl())
    assert rocm_gfx950.guard_ok() == (True, "large shapes bypass tgemm")


def test_size_guard_patch_keeps_huge_gemms_off_tgemm(
    with_aiter: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    utils = engine.layers_utils()
    reached: list[tuple[int, ...]] = []

    def vllm_gemm(layer: Any, x: torch.Tensor, weight: torch.Tensor, bias: Any = None) -> Any:
        reached.append(tuple(x.shape))  # stands in for the custom op that may call tgemm
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    monkeypatch.setattr(utils, "rocm_unquantized_gemm", vllm_gemm)
    rocm_gfx950.patch(Settings({}), Finding("missing", "", ("guard",)), Changes())
    gemm = utils.dispatch_unquantized_gemm()  # what UnquantizedLinearMethod stores
    n, m, k = HUGE
    meta = {"device": "meta", "dtype": torch.bfloat16}
    out = gemm(None, torch.empty((n, k), **meta), torch.empty((m, k), **meta))
    assert out.shape == (n, m) and reached == []
    gemm(None, torch.empty((16, k), **meta), torch.empty((64, k), **meta))
    assert reached == [(16, k)]
    assert "aiter-tgemm-large-shape-guard" in [p.name for p in ledger.applied()]


def test_the_second_probe_sees_the_size_guard_patch_and_its_undo() -> None:
    utils = engine.layers_utils()
    if rocm_gfx950.guard_ok()[0]:
        pytest.skip("this vLLM guards large shapes itself (0.33)")
    found = utils.rocm_unquantized_gemm
    changes = Changes()
    rocm_gfx950.patch(Settings({}), Finding("missing", "", ("guard",)), changes)
    assert rocm_gfx950.guard_ok() == (
        True, "large shapes bypass tgemm (gemmguard's guard in front of vLLM's GEMM)")
    changes.undo()
    assert utils.rocm_unquantized_gemm is found and not rocm_gfx950.guard_ok()[0]
    assert ledger.applied() == []
