"""The changes one fix's patch makes to vLLM, recorded so that a failed patch can be undone.

A patch receives a `Changes` and makes every edit through it. When the patch raises, or the
second probe after it does not show the fixed behaviour, `fixes.apply_all` calls `undo()` and
vLLM is exactly as it was found: attributes rebound back (or deleted if they were absent),
containers edited in place restored to their old contents, ledger entries withdrawn.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, MutableMapping, MutableSequence, MutableSet
from typing import Any

from gemmguard import ledger
from gemmguard.errors import GemmguardError

__all__ = ["Changes", "UndoFailed"]

_ABSENT = object()


class UndoFailed(GemmguardError):
    """Some of a patch's changes could not be taken back; `errors` holds why, per change."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__(
            f"{len(errors)} change(s) to vLLM could not be undone: {'; '.join(errors)}. "
            "This process runs a partly patched vLLM: restart it with the fix disabled "
            "(GEMMGUARD_FIXES_DISABLE=<fix>) and report the error."
        )
        self.errors = errors


class Changes:
    """Edits to vLLM made through this object, newest last, each with its inverse."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, Callable[[], None]]] = []

    def __len__(self) -> int:
        return len(self._undo)

    def setattr(self, target: Any, name: str, value: Any) -> None:
        """`setattr(target, name, value)`; undone by rebinding the old value (or deleting it)."""
        # The object's own attribute, not an inherited one: a class method stays on its class.
        old = vars(target).get(name, _ABSENT) if hasattr(target, "__dict__") else getattr(
            target, name, _ABSENT)
        setattr(target, name, value)

        def restore() -> None:
            if old is _ABSENT:
                delattr(target, name)
            else:
                setattr(target, name, old)

        self._undo.append((f"{_label(target)}.{name}", restore))

    def keep_contents(self, container: MutableMapping[Any, Any] | MutableSet[Any]
                      | MutableSequence[Any], label: str) -> None:
        """Before editing `container` in place: its current contents come back on undo."""
        saved = copy.copy(container)

        def restore() -> None:
            if isinstance(container, MutableSequence):
                container[:] = list(saved)
                return
            container.clear()
            if isinstance(container, MutableMapping):
                container.update(saved)
            else:
                for item in saved:
                    container.add(item)

        self._undo.append((label, restore))

    def call(self, label: str, do: Callable[[], None], undo: Callable[[], None]) -> None:
        """Run `do` now and `undo` on undo (for edits with no attribute or container form)."""
        do()
        self._undo.append((label, undo))

    def record(self, patch: ledger.Patch) -> None:
        """Note `patch` in the ledger; withdrawn on undo unless it was already there."""
        if patch.name in {p.name for p in ledger.applied()}:
            return
        ledger.record(patch)
        self._undo.append((f"ledger {patch.name}", lambda: ledger.withdraw(patch.name)))

    def undo(self) -> list[str]:
        """Take back every change, newest first; returns what was undone.

        Raises UndoFailed after trying every change if any of them could not be undone.
        """
        errors, undone = [], []
        while self._undo:
            label, restore = self._undo.pop()
            try:
                restore()
            except Exception as exc:  # keep going: every other change must still be undone
                errors.append(f"{label}: {exc!r}")
            else:
                undone.append(label)
        if errors:
            raise UndoFailed(errors)
        return undone


def _label(target: Any) -> str:
    return str(getattr(target, "__name__", type(target).__name__))
