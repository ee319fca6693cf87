"""The fix registry: states, once-per-process patching, start-up warnings, the report."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

import gemmguard.fixes as fixes
from gemmguard import ledger, vllm_adapter
from gemmguard.config import Settings
from gemmguard.fixes import Changes, Finding, Fix, FixNotPatchable
from gemmguard.kernels.portable_fp8_block import PORTABLE_KERNEL_NAMES


class Engine:
    """A stand-in engine with one behaviour a fix can be missing: `fixed`."""

    fixed = False


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A process that has not applied or detected anything yet, and an unfixed Engine."""
    monkeypatch.setattr(fixes, "_APPLIED", {})
    monkeypatch.setattr(fixes, "_DETECTED", {})
    monkeypatch.setattr(ledger, "_APPLIED", {})
    yield
    Engine.fixed = False
    if "added" in vars(Engine):
        del Engine.added


def fake(name: str, finding: Finding | Exception, patch: Any = None, applies: bool = True,
         verify: Any = None) -> Fix:
    def detect() -> Finding:
        if isinstance(finding, Exception):
            raise finding
        return finding

    return Fix(name=name, title=f"{name} title", consequence=f"{name} breaks.",
               remedy=f"Work around {name}.", hardware="somewhere", applies=lambda: applies,
               detect=detect, patch=patch,
               verify=verify or (lambda settings: Finding("upstream", "fixed now")))


def test_every_state_and_a_warning_for_each_missing_fix(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    patched: list[str] = []

    def patch(settings: Settings, finding: Finding, changes: Changes) -> str:
        patched.append(finding.detail)
        return "done"

    def cannot(settings: Settings, finding: Finding, changes: Changes) -> str:
        raise FixNotPatchable("no hook here")

    def broken(settings: Settings, finding: Finding, changes: Changes) -> str:
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
        fake("undecided", Finding("unknown", "could not tell", ("part?",)), patch),
    ])
    with caplog.at_level(logging.WARNING, logger="gemmguard.fixes"):
        rows = {r["fix"]: r for r in fixes.apply_all(Settings({}))}
    assert {k: r["state"] for k, r in rows.items()} == {
        "up": "upstream", "fixed": "patched", "unpatchable": "missing", "nopatch": "missing",
        "crashing": "missing", "probe-fails": "unknown", "elsewhere": "not_applicable",
        "undecided": "unknown",
    }
    assert rows["fixed"]["detail"] == "absent; patched: done"
    assert rows["elsewhere"]["detail"].startswith("applies to somewhere; this process runs on ")
    assert rows["probe-fails"]["detail"] == (
        "detection failed: the probe raised RuntimeError('no such attribute')")
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for name in ("unpatchable", "nopatch", "crashing", "probe-fails", "undecided"):
        assert f"'{name}'" in warned and f"{name} breaks." in warned
    assert "no hook here" in warned and "Work around nopatch." in warned
    assert "'fixed'" not in warned and "'up'" not in warned
    fixes.apply_all(Settings({}))
    assert patched == ["absent"]  # idempotent: patched once per process


def test_a_platform_probe_that_raises_gives_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_device() -> bool:
        raise RuntimeError("no device")

    fix = Fix(name="p", title="p title", consequence="c.", remedy="r.", hardware="GPUs",
              applies=no_device, detect=lambda: pytest.fail("detected on an unknown platform"))
    monkeypatch.setattr(fixes, "all_fixes", lambda: [fix])
    (row,) = fixes.apply_all(Settings({}))
    assert row["state"] == "unknown"
    assert row["detail"] == ("could not tell whether it applies here: the probe raised "
                             "RuntimeError('no device')")


def fix_engine(settings: Settings, finding: Finding, changes: Changes) -> str:
    """A patch that really changes the stand-in engine, through `changes`."""
    changes.setattr(Engine, "fixed", True)
    changes.setattr(Engine, "added", "by the patch")
    return "fixed set"


def engine_state() -> dict[str, Any]:
    return {k: v for k, v in vars(Engine).items() if not k.startswith("__")}


def probe_engine(settings: Settings) -> Finding:
    return Finding("upstream", "fixed") if Engine.fixed else Finding("missing", "not fixed",
                                                                       ("fixed",))


def test_patched_only_when_the_second_probe_shows_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    missing = Finding("missing", "not fixed", ("fixed",))
    monkeypatch.setattr(fixes, "all_fixes", lambda: [
        fake("works", missing, fix_engine, verify=probe_engine)])
    (row,) = fixes.apply_all(Settings({}))
    assert row["state"] == "patched" and Engine.fixed


def test_a_no_op_patch_is_missing_and_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    before = engine_state()
    calls: list[str] = []

    def no_op(settings: Settings, finding: Finding, changes: Changes) -> str:
        changes.setattr(Engine, "added", "by the patch")  # changes something, not the behaviour
        calls.append("patched")
        return "tried"

    missing = Finding("missing", "not fixed", ("fixed",))
    monkeypatch.setattr(fixes, "all_fixes", lambda: [
        fake("noop", missing, no_op, verify=probe_engine)])
    (row,) = fixes.apply_all(Settings({}))
    assert calls == ["patched"]
    assert row["state"] == "missing"
    assert row["detail"] == ("not fixed; the patch (tried) did not take: a second probe after it "
                             "finds not fixed (its 1 change(s) were undone, vLLM is as found)")
    assert engine_state() == before


def test_a_second_probe_that_raises_gives_unknown_and_undoes_the_patch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = engine_state()

    def raising(settings: Settings) -> Finding:
        raise KeyError("gone")

    missing = Finding("missing", "not fixed", ("fixed",))
    monkeypatch.setattr(fixes, "all_fixes", lambda: [
        fake("unverifiable", missing, fix_engine, verify=raising)])
    (row,) = fixes.apply_all(Settings({}))
    assert row["state"] == "unknown"
    assert "the second probe raised KeyError('gone')" in row["detail"]
    assert "its 2 change(s) were undone" in row["detail"]
    assert engine_state() == before


def test_a_patch_that_fails_halfway_leaves_the_engine_as_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = engine_state()
    table = {"kept": 1}

    def halfway(settings: Settings, finding: Finding, changes: Changes) -> str:
        changes.setattr(Engine, "fixed", True)
        changes.keep_contents(table, "table")
        table.clear()
        table["new"] = 2
        changes.record(ledger.Patch("p", "why", "how", "upstream", "remove when"))
        raise RuntimeError("second step failed")

    missing = Finding("missing", "not fixed", ("fixed",))
    monkeypatch.setattr(fixes, "all_fixes", lambda: [
        fake("halfway", missing, halfway, verify=probe_engine)])
    (row,) = fixes.apply_all(Settings({}))
    assert row["state"] == "missing"
    assert row["detail"] == ("not fixed; the patch failed: RuntimeError('second step failed') "
                             "(its 3 change(s) were undone, vLLM is as found)")
    assert engine_state() == before and table == {"kept": 1} and ledger.applied() == []


def test_a_disabled_fix_is_detected_but_not_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    missing = Finding("missing", "absent", ("part",))
    monkeypatch.setattr(fixes, "all_fixes", lambda: [
        fake("a", missing, lambda s, f, c: calls.append("a") or "done"),
        fake("b", missing, lambda s, f, c: calls.append("b") or "done"),
    ])
    rows = fixes.apply_all(Settings({"GEMMGUARD_FIXES_DISABLE": "a"}))
    assert [r["state"] for r in rows] == ["missing", "patched"] and calls == ["b"]
    assert "GEMMGUARD_FIXES_DISABLE" in rows[0]["detail"]


def test_report_without_apply_all_only_detects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fixes, "all_fixes", lambda: [
        fake("x", Finding("missing", "absent", ("p",)), lambda s, f, c: pytest.fail("patched"))
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

    from gemmguard.vllm_adapter import fixes as engine
    from helpers import simulate

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
