"""The DeepGEMM known-bad list as data: the packaged file plus GEMMGUARD_DEEPGEMM_EXCLUDE."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemmguard.config import Settings
from gemmguard.errors import ConfigError

KNOWN_BAD_FILE = Path(__file__).with_name("deepgemm_known_bad.json")
# The only kernel vLLM's exclusion table governs; deny other kernels with GEMMGUARD_DENY_KERNELS.
KERNELS = ("deep_gemm",)
_ENTRY_KEYS = {"model_type", "families", "kernel", "reason", "source"}


@dataclass(frozen=True)
class KnownBad:
    """One model type that must not run `kernel` on the listed device families."""

    model_type: str
    families: tuple[int, ...]
    kernel: str = "deep_gemm"
    reason: str = ""


def _entry(raw: Any) -> KnownBad:
    if not isinstance(raw, dict) or not {"model_type", "families"} <= raw.keys():
        raise ValueError(f"each entry needs 'model_type' and 'families', got {raw!r}")
    unknown = raw.keys() - _ENTRY_KEYS
    if unknown:
        raise ValueError(
            f"unknown key(s) {sorted(unknown)} in {raw!r}; allowed: {sorted(_ENTRY_KEYS)}"
        )
    kernel = raw.get("kernel", "deep_gemm")
    if kernel not in KERNELS:
        raise ValueError(f"kernel '{kernel}' is not governed by this table (only {KERNELS}); "
                         "turn other kernels down with GEMMGUARD_DENY_KERNELS")
    families = raw["families"]
    if not families or not all(isinstance(f, int) and f % 10 == 0 for f in families):
        raise ValueError(f"families must be device families like 100 or 120 (SM10x, SM12x), "
                         f"got {families!r}")
    return KnownBad(str(raw["model_type"]), tuple(families), kernel, str(raw.get("reason", "")))


def load_file(path: Path = KNOWN_BAD_FILE) -> list[KnownBad]:
    """Entries of a known-bad JSON file ({"entries": [...]})."""
    try:
        return [_entry(raw) for raw in json.loads(path.read_text())["entries"]]
    except OSError as exc:  # e.g. a wheel built without the package data
        raise ConfigError(f"cannot read the known-bad list {path}: {exc}. Reinstall gemmguard "
                          "with its package data (fixes/*.json).") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a valid known-bad list: {exc}. Fix or remove the "
                          "entry; the format is described in the packaged file's 'about'.") from exc


def parse_spec(value: str) -> tuple[KnownBad, ...]:
    """Entries from `model_type:family[/family…]`, comma-separated (e.g. `glm4_moe:100/120`)."""
    entries = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        model_type, sep, families = item.partition(":")
        try:
            parsed = tuple(int(f) for f in families.split("/"))
        except ValueError:
            parsed = ()
        if not sep or not model_type or not parsed:
            raise ValueError(
                f"'{item}' is not model_type:family[/family...], e.g. glm4_moe:100/120"
            )
        entries.append(_entry({"model_type": model_type, "families": list(parsed)}))
    return tuple(entries)


def known_bad(settings: Settings) -> list[KnownBad]:
    """The packaged list plus the operator's additions."""
    return load_file() + list(settings.deepgemm_exclude)


def forced(settings: Settings) -> frozenset[str]:
    """Model types the operator wants DeepGEMM for despite the list ("*" for all)."""
    return frozenset(settings.deepgemm_force)
