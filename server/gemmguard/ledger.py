"""The ledger of runtime patches gemmguard applies to vLLM: why, how, upstream, removal.

Every patch site declares its `Patch` beside the code and calls `record` when it applies,
so `gemmguard fixes` and a reader of the code see the same list.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger("vllm.gemmguard")


@dataclass(frozen=True)
class Patch:
    """One runtime change to vLLM, with the reasons a maintainer needs to remove it later."""

    name: str
    why: str
    how: str
    upstream: str
    remove_when: str


_APPLIED: dict[str, Patch] = {}
# Patches (or parts of one) that found nothing to attach to in this vLLM: name → what is lost.
_MISSING: dict[str, str] = {}


def record(patch: Patch) -> None:
    """Note that `patch` is applied in this process."""
    _APPLIED[patch.name] = patch


def applied() -> list[Patch]:
    """Patches applied in this process, in the order they were applied."""
    return list(_APPLIED.values())


def withdraw(name: str) -> None:
    """Forget the patch called `name` (it was undone)."""
    _APPLIED.pop(name, None)


def record_missing(name: str, lost: str) -> None:
    """Note, loudly, that the hook `name` could not attach to the installed vLLM and what
    gemmguard cannot do without it. Never a silent skip: the log says it now, the ranks'
    build info and `gemmguard_hook_missing` say it for as long as the server runs."""
    if name not in _MISSING:
        logger.warning("gemmguard: hook %s could not attach to this vLLM: %s. Run "
                       "`make contract-source VLLM=<version>` to see what moved.", name, lost)
    _MISSING[name] = lost


def missing() -> dict[str, str]:
    """Hooks that could not attach in this process, and what is lost without each."""
    return dict(_MISSING)
