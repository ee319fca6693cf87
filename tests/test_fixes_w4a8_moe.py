"""Fix 2: W4A8-FP8 MoE weight conversion: call order (sync) and the scale reshape."""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable
from typing import Any

import pytest
import torch

from gemmguard import ledger
from gemmguard.config import Settings
from gemmguard.fixes import Changes, Finding, w4a8_moe
from gemmguard.vllm_adapter import fixes as engine


def pre_fix(fn: Callable[..., Any], drop: str = "", replace: tuple[str, str] = ("", "")) -> Any:
    """`fn` rebuilt from its own source with the fix taken out (lines dropped or text replaced)."""
    source = textwrap.dedent(inspect.getsource(fn))
    lines = [line for line in source.splitlines() if not (drop and drop in line)]
    source = "\n".join(lines).replace(*replace) if replace[0] else "\n".join(lines)
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<pre-fix {fn.__name__}>", "exec"), fn.__globals__, namespace)
    return namespace[fn.__name__]


@pytest.fixture(autouse=True)
def restore(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the tests or the patch rebind is put back afterwards."""
    monkeypatch.setattr(ledger, "_APPLIED", {})
    ops = engine.custom_ops()
    for name in w4a8_moe.REORDERS:
        monkeypatch.setattr(ops, name, getattr(ops, name, None), raising=False)
    mixed = inspect.getmodule(engine.cutlass_w4a8_linear_kernel())
    for module in (engine.quant_utils(), mixed):
        monkeypatch.setattr(module, w4a8_moe.RESHAPE, getattr(module, w4a8_moe.RESHAPE))


def old_reshape(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scale conversion with its pre-fix `view(shape[:-1], -1)`, wherever it is bound."""
    old = pre_fix(engine.quant_utils().convert_bf16_scales_to_fp8,
                  replace=("view(*orig_shape[:-1], -1)", "view(orig_shape[:-1], -1)"))
    mixed = inspect.getmodule(engine.cutlass_w4a8_linear_kernel())
    for module in (engine.quant_utils(), mixed):
        monkeypatch.setattr(module, w4a8_moe.RESHAPE, old)


def test_scale_reshape_is_detected_by_behaviour_and_patched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert w4a8_moe.reshape_ok()[0]
    old_reshape(monkeypatch)
    ok, text = w4a8_moe.reshape_ok()
    assert not ok and "fails on a (2, 8, 4) scale tensor" in text
    finding = w4a8_moe.detect()
    assert finding.missing_parts == ("reshape",)
    w4a8_moe.patch(Settings({}), finding, Changes())
    assert w4a8_moe.reshape_ok()[0]
    mixed = inspect.getmodule(engine.cutlass_w4a8_linear_kernel())
    assert getattr(mixed, w4a8_moe.RESHAPE) is w4a8_moe.convert_bf16_scales_to_fp8
    assert [p.name for p in ledger.applied()] == ["w4a8-scale-reshape"]


def recorders(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Recording stand-ins for the CUDA ops of the W4A8 MoE weight conversion."""
    calls: list[str] = []
    quant_utils = engine.quant_utils()
    ops = engine.custom_ops()
    monkeypatch.setattr(quant_utils, w4a8_moe.CONVERT, lambda t: calls.append("convert"))
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda *a: calls.append("sync"))
    monkeypatch.setattr(ops, "cutlass_encode_and_reorder_int4b_grouped",
                        lambda t: calls.append("reorder") or (t, t), raising=False)
    monkeypatch.setattr(ops, "cutlass_pack_scale_fp8", lambda t: t, raising=False)
    monkeypatch.setattr(quant_utils, w4a8_moe.RESHAPE, lambda q, s: (s, s))
    import vllm.model_executor.layers.quantization.input_quant_fp8 as input_quant

    monkeypatch.setattr(input_quant, "QuantFP8", lambda **kwargs: None)  # a CustomOp needs a config
    return calls


def convert() -> None:
    """vLLM's W4A8 MoE weight conversion (CUTLASS backend) on small stand-in tensors."""
    fn = engine.w4a8_moe_converter()
    backend = fn.__globals__["W4A8MoeBackend"].CUTLASS
    w, s = torch.zeros(2, 4, 4, dtype=torch.int32), torch.ones(2, 4, 4)
    fn(backend, None, 128, w, w.clone(), s, s.clone())


def test_conversion_syncs_before_each_reorder(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = recorders(monkeypatch)
    convert()
    assert calls == ["convert", "sync", "reorder"] * 2
    assert w4a8_moe.sync_ok()[0]


def test_missing_sync_is_detected_and_the_patch_restores_the_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = recorders(monkeypatch)
    oracle = inspect.getmodule(engine.w4a8_moe_converter())
    unsynced = pre_fix(engine.w4a8_moe_converter(), drop="torch.accelerator.synchronize()")
    monkeypatch.setattr(oracle, "convert_to_w4a8_moe_kernel_format", unsynced)
    convert()
    assert calls == ["convert", "reorder"] * 2  # the race's precondition
    ok, text = w4a8_moe.sync_ok()
    assert not ok and "MoE oracle" in text and "linear kernel" not in text
    finding = w4a8_moe.detect()
    assert "sync" in finding.missing_parts  # (the reshape stand-in above fails its probe too)
    changes = Changes()
    w4a8_moe.patch(Settings({}), Finding("missing", text, ("sync",)), changes)
    calls.clear()
    convert()
    assert calls == ["convert", "sync", "reorder"] * 2
    assert [p.name for p in ledger.applied()] == ["w4a8-sync-before-reorder"]
    # The second probe sees the patched ops synchronize first; after an undo it sees the race.
    assert w4a8_moe.sync_ok()[0] and "synchronize first" in w4a8_moe.sync_ok()[1]
    changes.undo()
    assert not w4a8_moe.sync_ok()[0] and ledger.applied() == []


def test_synchronizes_first_tells_a_synced_wrapper_from_a_plain_op() -> None:
    def reorder(t: Any) -> Any:
        return t

    assert not w4a8_moe.probe.synchronizes_first(reorder)
    assert not w4a8_moe.probe.synchronizes_first(torch.add)  # a builtin op: no Python to sync
    assert w4a8_moe.probe.synchronizes_first(w4a8_moe._synchronized(reorder))
