"""Fix 4: the FP8 indexer wk loader: upcast, order, and pairs split across load_weights calls."""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from gemmguard import ledger
from gemmguard.config import Settings
from gemmguard.fixes import Changes, Finding, FixNotPatchable, deepseek_indexer_wk
from gemmguard.vllm_adapter import fixes as engine

LOADER = engine.INDEXER_WK_LOADER
PREFIX = "model.layers.3.self_attn.indexer"


@pytest.fixture(autouse=True)
def restore(monkeypatch: pytest.MonkeyPatch) -> None:
    """Put back every binding of the loader, the import hooks and the ledger."""
    import vllm.model_executor.models.deepseek_mtp  # noqa: F401  (imports the loader by name)

    monkeypatch.setattr(ledger, "_APPLIED", {})
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    for name, module in list(sys.modules.items()):
        if name.startswith("vllm.") and isinstance(vars(module).get(LOADER), types.FunctionType):
            monkeypatch.setattr(module, LOADER, vars(module)[LOADER])


def load(loader: Any, parts: list[tuple[str, dict[str, Any]]]) -> list[torch.Tensor]:
    """Feed (part, buffer) pairs to `loader` as load_weights() calls would; what got loaded."""
    loaded: list[torch.Tensor] = []
    param = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    param.weight_loader = lambda p, w, shard: loaded.append(w)  # type: ignore[attr-defined]
    params = {f"{PREFIX}.wk_weights_proj.weight": param}
    weight = torch.full((256, 128), 2.0).to(torch.float8_e4m3fn)
    for part, buf in parts:
        tensor = weight if part == "weight" else torch.tensor([[0.25], [4.0]])
        loader(f"{PREFIX}.wk.{part}", tensor, buf, params, set(), [])
    return loaded


def test_fp8_wk_is_upcast_to_bf16_in_either_order() -> None:
    loader = getattr(engine.deepseek_v2(), LOADER)
    buf: dict[str, Any] = {}
    (scale_first,) = load(loader, [("weight_scale_inv", buf), ("weight", buf)])
    assert scale_first.dtype == torch.bfloat16
    assert scale_first[0, 0] == 0.5 and scale_first[255, 0] == 8.0
    assert deepseek_indexer_wk.upcast_ok()[0]


def test_an_order_dependent_or_absent_upcast_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    module = engine.deepseek_v2()
    original = getattr(module, LOADER)

    def weight_first_only(name: str, tensor: Any, buf: dict[str, Any], *rest: Any) -> bool:
        if "weight_scale" in name and not buf:
            return True  # a scale that comes before its weight is dropped
        return bool(original(name, tensor, buf, *rest))

    monkeypatch.setattr(module, LOADER, weight_first_only)
    ok, text = deepseek_indexer_wk.upcast_ok()
    assert not ok and "weight_scale_inv then weight" in text
    monkeypatch.delattr(module, LOADER)
    finding = deepseek_indexer_wk.detect()
    assert finding.missing_parts == ("upcast",)
    with pytest.raises(FixNotPatchable, match="upcast itself is missing"):
        deepseek_indexer_wk.patch(Settings({}), finding, Changes())


def test_a_pair_split_across_load_weights_calls_loads_once_patched() -> None:
    mtp = sys.modules["vllm.model_executor.models.deepseek_mtp"]
    # Two load_weights() calls, each with its own buffer, as 0.32's MTP/V3.2 loaders do.
    assert load(getattr(mtp, LOADER), [("weight", {}), ("weight_scale_inv", {})]) == []
    finding = deepseek_indexer_wk.detect()
    if "pairing" not in finding.missing_parts:
        pytest.skip("every loader of this vLLM keeps its buffer across calls")
    deepseek_indexer_wk.patch(Settings({}), finding, Changes())
    (loaded,) = load(getattr(mtp, LOADER), [("weight", {}), ("weight_scale_inv", {})])
    assert loaded.dtype == torch.bfloat16 and loaded[0, 0] == 0.5
    assert getattr(engine.deepseek_v2(), LOADER) is getattr(mtp, LOADER)
    assert "indexer-wk-pairing-across-calls" in [p.name for p in ledger.applied()]


def test_the_second_probe_sees_the_pairing_patch_and_its_undo() -> None:
    finding = deepseek_indexer_wk.detect()
    if "pairing" not in finding.missing_parts:
        pytest.skip("every loader of this vLLM keeps its buffer across calls")
    assert deepseek_indexer_wk.verify(Settings({})).state == "missing"
    hooks = list(sys.meta_path)
    changes = Changes()
    deepseek_indexer_wk.patch(Settings({}), finding, changes)
    assert deepseek_indexer_wk.verify(Settings({})).state == "upstream"
    changes.undo()
    assert sys.meta_path == hooks and ledger.applied() == []
    mtp = sys.modules["vllm.model_executor.models.deepseek_mtp"]
    assert load(getattr(mtp, LOADER), [("weight", {}), ("weight_scale_inv", {})]) == []
    assert "still lost" in deepseek_indexer_wk.verify(Settings({})).detail


def test_a_model_module_imported_later_is_wrapped_on_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "late_model.py").write_text(f"def {LOADER}(name, tensor, buf, params, loaded):\n"
                                            "    return buf\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "late_model", raising=False)
    sys.meta_path.insert(0, deepseek_indexer_wk._WrapOnImport(frozenset({"late_model"})))
    import late_model  # type: ignore[import-not-found]

    assert late_model._try_load_fp8_indexer_wk.__gemmguard_fix__ == deepseek_indexer_wk.NAME


PER_CALL = """
def load_weights(self, weights):
    _pending: dict = {}
    for name, w in weights:
        _try_load_fp8_indexer_wk(name, w, _pending, params, loaded)
"""
ON_MODEL = """
def load_weights(self, weights):
    _pending = getattr(self, "_pending_indexer_wk_fp8", None)
    if _pending is None:
        self._pending_indexer_wk_fp8 = _pending = {}
    for name, w in weights:
        _try_load_fp8_indexer_wk(name, w, _pending, params, loaded)
"""


@pytest.mark.parametrize(("source", "per_call"), [(PER_CALL, True), (ON_MODEL, False)])
def test_buffer_lifetime_is_read_from_the_callers_source(source: str, per_call: bool) -> None:
    fn = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef))
    call = next(n for n in ast.walk(fn) if isinstance(n, ast.Call)
                and getattr(n.func, "id", "") == LOADER)
    assert deepseek_indexer_wk._per_call(fn, call) is per_call


def test_detect_names_the_loaders_with_a_per_call_buffer() -> None:
    finding = deepseek_indexer_wk.detect()
    callers = deepseek_indexer_wk.per_call_callers()
    assert "model_executor.models.deepseek_v2:load_weights" not in callers  # on the model
    assert (finding.state == "missing") == bool(callers)
    assert all(caller in finding.detail for caller in callers)
    assert isinstance(finding, Finding)
