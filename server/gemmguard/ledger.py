"""The ledger of runtime patches gemmguard applies to vLLM: why, how, upstream, removal.

Every patch site declares its `Patch` beside the code and calls `record` when it applies,
so `gemmguard fixes` and a reader of the code see the same list.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Patch:
    """One runtime change to vLLM, with the reasons a maintainer needs to remove it later."""

    name: str
    why: str
    how: str
    upstream: str
    remove_when: str


_APPLIED: dict[str, Patch] = {}


def record(patch: Patch) -> None:
    """Note that `patch` is applied in this process."""
    _APPLIED[patch.name] = patch


def applied() -> list[Patch]:
    """Patches applied in this process, in the order they were applied."""
    return list(_APPLIED.values())


def withdraw(name: str) -> None:
    """Forget the patch called `name` (it was undone)."""
    _APPLIED.pop(name, None)
