"""The fix registry: states, once-per-process patching, start-up warnings, the report."""

from __future__ import annotations

import logging
from typing import Any

import pytest

import gemmguard.fixes as fixes
from gemmguard import ledger, vllm_adapter
from gemmguard.config import Settings
from gemmguard.fixes import Finding, Fix, FixNotPatchable
from gemmguard.kernels.portable_fp8_block import PORTABLE_KERNEL_NAMES


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that has not applied or detected anything yet."""
    monkeypatch.setattr(fixes, "_APPLIED", {})
    monkeypatch.setattr(fixes, "_DETECTED", {})
    monkeypatch.setattr(ledger, "_APPLIED", {})


def fake(name: str, finding: Finding | Exception, patch: Any = None, applies: bool = True) -> Fix:
    def detect() -> Finding:
        if isinstance(finding, Exception):
            raise finding
        return finding

    return Fix(name=name, title=f"{name} title", consequence=f"{name} breaks.",
               remedy=f"Work around {name}.", hardware="somewhere", applies=lambda: applies,
               detect=detect, patch=patch)


def test_every_state_and_a_warning_for_each_missing_fix(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    patched: list[str] = []

    def patch(settings: Settings, finding: Finding) -> str:
        patched.append(finding.detail)
        return "done"

    def cannot(settings: Settings, finding: Finding) -> str:
        raise FixNotPatchable("no hook here")

    def broken(settings: Settings, finding: Finding) -> str:
        raise RuntimeError("boom")

    missing = Finding("missing", "absent", ("part",))
    monkeypatch.setattr(fixes, "all_fixes", lambda: [
        fake("up", Finding("upstream", "fine")),
        fake("fixed", missing, patch),
        fake("unpatchable", missing, cannot),
        fake("nopatch", missing),
        fake("crashing", missing, broken),
        fake("probe-fails", RuntimeError("no such attribute")),
        fake("elsewhere", missing, patch, applies=False),
    ])
    with caplog.at_level(logging.WARNING, logger="gemmguard.fixes"):
        rows = {r["fix"]: r for r in fixes.apply_all(Settings({}))}
    assert {k: r["state"] for k, r in rows.items()} == {
        "up": "upstream", "fixed": "patched", "unpatchable": "missing", "nopatch": "missing",
        "crashing": "missing", "probe-fails": "missing", "elsewhere": "not_applicable",
    }
    assert rows["fixed"]["detail"] == "absent; patched: done"
    assert rows["elsewhere"]["detail"].startswith("applies to somewhere; this process runs on ")
    assert "detection failed" in rows["probe-fails"]["detail"]
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for name in ("unpatchable", "nopatch", "crashing", "probe-fails"):
        assert f"'{name}'" in warned and f"{name} breaks." in warned
    assert "no hook here" in warned and "Work around nopatch." in warned
    assert "'fixed'" not in warned and "'up'" not in warned
    fixes.apply_all(Settings({}))
    assert patched == ["absent"]  # idempotent: patched once per process


def test_a_disabled_fix_is_detected_but_not_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    missing = Finding("missing", "absent", ("part",))
    monkeypatch.setattr(fixes, "all_fixes", lambda: [
        fake("a", missing, lambda s, f: calls.append("a") or "done"),
        fake("b", missing, lambda s, f: calls.append("b") or "done"),
    ])
    rows = fixes.apply_all(Settings({"GEMMGUARD_FIXES_DISABLE": "a"}))
    assert [r["state"] for r in rows] == ["missing", "patched"] and calls == ["b"]
    assert "GEMMGUARD_FIXES_DISABLE" in rows[0]["detail"]


def test_report_without_apply_all_only_detects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fixes, "all_fixes", lambda: [
        fake("x", Finding("missing", "absent", ("p",)), lambda s, f: pytest.fail("patched"))
    ])
    assert fixes.report() == [{"fix": "x", "title": "x title", "state": "missing",
                               "detail": "absent"}]


def test_the_real_fixes_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    lists = vllm_adapter.candidate_lists("fp8_block")
    for platform in type(next(iter(lists))):
        own = [k for k in lists.get(platform, []) if k.__name__ not in PORTABLE_KERNEL_NAMES]
        monkeypatch.setitem(lists, platform, own)
    rows = fixes.apply_all(Settings({}))
    assert [r["fix"] for r in rows] == [
        "deepgemm-blackwell", "w4a8-moe", "rocm-gfx950", "deepseek-indexer-wk",
        "marlin-fp8-block", "portable-fp8",
    ]
    assert all(set(r) == {"fix", "title", "state", "detail"} for r in rows)
    assert all(r["state"] in fixes.STATES for r in rows)
    states = {r["fix"]: r["state"] for r in rows}
    assert states["rocm-gfx950"] == "not_applicable"  # a CPU (or CUDA) box is not gfx950
    assert states["portable-fp8"] in ("upstream", "patched")  # patched unless the CPU has AMX


def test_the_real_fixes_on_a_simulated_b200(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from gemmguard.fixes import simulate
    from gemmguard.vllm_adapter import fixes as engine

    dg = engine.deep_gemm_module()
    monkeypatch.setattr(dg, engine.EXCLUSION_TABLE, type(getattr(dg, engine.EXCLUSION_TABLE))(
        getattr(dg, engine.EXCLUSION_TABLE)))
    oracle = engine.fp8_moe_oracle()
    monkeypatch.setattr(oracle, "_get_priority_backends", oracle._get_priority_backends)
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    loader = engine.INDEXER_WK_LOADER
    for name, module in list(sys.modules.items()):
        if name.startswith("vllm.") and loader in vars(module):
            monkeypatch.setattr(module, loader, vars(module)[loader])
    simulate.clear_caches()
    simulate.cuda(monkeypatch, 100)
    states = {r["fix"]: r["state"] for r in fixes.apply_all(Settings({}))}
    simulate.clear_caches()
    assert states["deepgemm-blackwell"] == "patched"  # opt-in and the warning, in every vLLM
    assert states["w4a8-moe"] == "upstream"
    assert states["rocm-gfx950"] == "not_applicable"
    assert states["marlin-fp8-block"] == "not_applicable"  # sm_100 has CUTLASS block FP8
    assert states["deepseek-indexer-wk"] == "patched"  # glm5next / hy_v4 per-call buffers
    assert states["portable-fp8"] == "upstream"
