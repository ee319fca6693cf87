"""Engine fixes gemmguard carries: detect each in the installed vLLM, patch what it lacks.

Each fix module defines one `Fix`. `apply_all` runs from the general plugin in every vLLM
process; `report` feeds `gemmguard fixes`, `/gemmguard/v1/fixes` and the
`gemmguard_engine_fix_info{fix,state}` metric. States:

- upstream: the installed vLLM behaves correctly by itself;
- patched: it did not, and gemmguard's runtime patch (see `gemmguard.ledger`) makes it so;
- missing: it does not, and gemmguard could not (or was told not to) patch it;
- not_applicable: the fix concerns hardware this process is not running on;
- unknown: a probe raised or could not decide, so gemmguard cannot tell (the detail says why).

A fix is `patched` only when a second probe after its patch shows the fixed behaviour. A patch
makes every edit through a `Changes`; when it raises, or the second probe does not show the
fix, the edits are undone and vLLM is exactly as it was found.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from gemmguard.config import Settings
from gemmguard.config import settings as read_settings
from gemmguard.errors import GemmguardError
from gemmguard.fixes.changes import Changes, UndoFailed

__all__ = [
    "FIX_MODULES",
    "Changes",
    "STATES",
    "Finding",
    "Fix",
    "FixNotPatchable",
    "all_fixes",
    "apply_all",
    "report",
]

logger = logging.getLogger("gemmguard.fixes")

STATES = ("upstream", "patched", "missing", "not_applicable", "unknown")
State = Literal["upstream", "patched", "missing", "not_applicable", "unknown"]

# One module per fix, in the order of the issue (and of `gemmguard fixes`).
FIX_MODULES = (
    "deepgemm_blackwell",
    "w4a8_moe",
    "rocm_gfx950",
    "deepseek_indexer_wk",
    "marlin_fp8_block",
    "portable_fp8",
)


class FixNotPatchable(GemmguardError):
    """A fix is missing from the installed vLLM and gemmguard cannot patch it here."""


@dataclass(frozen=True)
class Finding:
    """What a probe of the installed engine found: the fix's parts, present or missing.

    `unknown` when some part could not be decided and none is known to be missing.
    """

    state: Literal["upstream", "missing", "unknown"]
    detail: str
    missing_parts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Fix:
    """One engine fix: how to tell it is there, and how to add it where it is not."""

    name: str
    title: str
    consequence: str  # what goes wrong while the fix is missing
    remedy: str  # what an operator can do when gemmguard cannot patch it
    hardware: str  # where it matters, in words (for the not_applicable detail)
    applies: Callable[[], bool]  # is it relevant on this platform at all?
    detect: Callable[[], Finding]  # probes behaviour; never changes vLLM
    # Makes a missing fix present, idempotently, every edit through the Changes (ledger.Patch
    # included); returns what it did, or raises FixNotPatchable.
    patch: Callable[[Settings, Finding, Changes], str] | None = None
    # The second probe, after `patch`: "upstream" when vLLM now shows the fixed behaviour.
    # Defaults to `detect`; a fix whose detect speaks for vLLM alone gives its own.
    verify: Callable[[Settings], Finding] | None = None


@dataclass
class _Result:
    state: State
    detail: str


_LOCK = threading.Lock()
_APPLIED: dict[str, _Result] = {}  # outcome of apply_all in this process
_DETECTED: dict[str, _Result] = {}  # detection only, where apply_all has not run


def all_fixes() -> list[Fix]:
    """Every fix gemmguard carries, in a stable order."""
    return [importlib.import_module(f"{__name__}.{m}").FIX for m in FIX_MODULES]


def _disabled(settings: Settings) -> frozenset[str]:
    return frozenset(settings.fixes_disable)


def _evaluate(fix: Fix) -> _Result | Finding:
    """A not_applicable (or undecidable) result, or what detection found."""
    from gemmguard.vllm_adapter import fixes as engine

    try:
        if not fix.applies():
            detail = f"applies to {fix.hardware}; this process runs on {engine.platform_label()}"
            return _Result("not_applicable", detail)
    except Exception as exc:  # a probe must never stop vLLM from starting
        return _Result("unknown", f"could not tell whether it applies here: the probe raised "
                       f"{exc!r}")
    try:
        return fix.detect()
    except Exception as exc:
        return _Result("unknown", f"detection failed: the probe raised {exc!r}")


def _warn_missing(fix: Fix, why: str) -> None:
    logger.warning(
        "gemmguard: engine fix '%s' (%s) is missing from this vLLM and is not patched: %s. "
        "Consequence: %s What to do: %s",
        fix.name, fix.title, why, fix.consequence, fix.remedy,
    )


def _warn_unknown(fix: Fix, why: str) -> None:
    logger.warning(
        "gemmguard: cannot tell whether engine fix '%s' (%s) is in this vLLM: %s. "
        "If it is missing: %s What to do: %s",
        fix.name, fix.title, why, fix.consequence, fix.remedy,
    )


def _undo(fix: Fix, changes: Changes) -> str:
    """Undo a patch's changes; the words for the fix's detail."""
    if not changes:
        return "it changed nothing"
    try:
        undone = changes.undo()
    except UndoFailed as exc:
        logger.error("gemmguard: engine fix '%s': %s", fix.name, exc)
        return str(exc)
    return f"its {len(undone)} change(s) were undone, vLLM is as found"


def _patch(fix: Fix, settings: Settings, finding: Finding) -> _Result:
    """Patch, probe again, and keep the patch only if the second probe shows the fix."""
    assert fix.patch is not None
    changes = Changes()
    try:
        done = fix.patch(settings, finding, changes)
    except GemmguardError as exc:  # FixNotPatchable, or a bad GEMMGUARD_* setting
        return _Result("missing", f"{finding.detail}; {exc} ({_undo(fix, changes)})")
    except Exception as exc:
        logger.exception("gemmguard: patching engine fix '%s' failed", fix.name)
        return _Result("missing", f"{finding.detail}; the patch failed: {exc!r} "
                       f"({_undo(fix, changes)})")
    try:
        after = (fix.verify or (lambda _: fix.detect()))(settings)
    except Exception as exc:
        return _Result("unknown", f"{finding.detail}; patched ({done}), but the second probe "
                       f"raised {exc!r}, so the patch is not trusted ({_undo(fix, changes)})")
    if after.state == "upstream":
        return _Result("patched", f"{finding.detail}; patched: {done}")
    state: State = "unknown" if after.state == "unknown" else "missing"
    return _Result(state, f"{finding.detail}; the patch ({done}) did not take: a second probe "
                   f"after it finds {after.detail} ({_undo(fix, changes)})")


def _apply_one(fix: Fix, settings: Settings, disabled: frozenset[str]) -> _Result:
    finding = _evaluate(fix)
    if isinstance(finding, _Result):
        result = finding
    elif finding.state != "missing":
        result = _Result(finding.state, finding.detail)
    elif fix.patch is None:
        result = _Result("missing", f"{finding.detail}; gemmguard has no runtime patch for it")
    elif fix.name in disabled or "all" in disabled:
        result = _Result("missing",
                         f"{finding.detail}; patching disabled by GEMMGUARD_FIXES_DISABLE")
    else:
        result = _patch(fix, settings, finding)
    if result.state == "missing":
        _warn_missing(fix, result.detail)
    elif result.state == "unknown":
        _warn_unknown(fix, result.detail)
    return result


def apply_all(settings: Settings | None = None) -> list[dict[str, str]]:
    """Detect every fix and patch the missing ones, once per process; returns `report()`."""
    settings = settings or read_settings()
    disabled = _disabled(settings)
    names = {fix.name for fix in all_fixes()}
    if disabled - names - {"all"}:
        logger.warning(
            "gemmguard: GEMMGUARD_FIXES_DISABLE names unknown fixes %s; they are ignored. "
            "Known fixes: %s (or 'all').", sorted(disabled - names - {"all"}), sorted(names),
        )
    with _LOCK:
        for fix in all_fixes():
            if fix.name not in _APPLIED:
                _APPLIED[fix.name] = _apply_one(fix, settings, disabled)
    return report()


def report() -> list[dict[str, str]]:
    """[{fix, title, state, detail}] for every fix: as applied, or as detected if not applied."""
    rows = []
    with _LOCK:
        for fix in all_fixes():
            result = _APPLIED.get(fix.name) or _DETECTED.get(fix.name)
            if result is None:
                found = _evaluate(fix)
                result = found if isinstance(found, _Result) else _Result(found.state, found.detail)
                _DETECTED[fix.name] = result
            rows.append(
                {"fix": fix.name, "title": fix.title, "state": result.state,
                 "detail": result.detail}
            )
    return rows
