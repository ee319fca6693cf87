"""gemmguard's runtime settings: GEMMGUARD_* environment variables, strictly cast.

`gemmguard serve` turns its options into these variables so that every vLLM process
(API servers, engine core, workers) and a restarted engine see the same settings.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from gemmguard.errors import ConfigError

PREFIX = "GEMMGUARD_"
T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")


def _csv(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


class Settings:
    """Reads GEMMGUARD_* variables from a mapping (the process environment by default)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    def get(self, key: str, cast: Callable[[str], T], default: T) -> T:
        """Value of PREFIX+key cast by `cast`, or `default` when unset or empty."""
        name = PREFIX + key
        raw = self._environ.get(name, "")
        if raw == "":
            return default
        try:
            return cast(raw)
        except ValueError as exc:
            raise ConfigError(
                f"{name} has value '{raw}', which is not valid: {exc}. "
                f"Unset it to use the default ({default!r})."
            ) from exc

    # Where demo checkpoints are made once and reused (default: ~/.cache/gemmguard).
    @property
    def cache_dir(self) -> Path:
        default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gemmguard"
        return self.get("CACHE_DIR", Path, default)

    # Kernel class names removed from every vLLM candidate list (default: none).
    @property
    def deny_kernels(self) -> tuple[str, ...]:
        return self.get("DENY_KERNELS", _csv, ())

    # Export one series per layer as well as the aggregates (default: on).
    @property
    def per_layer_metrics(self) -> bool:
        return self.get("PER_LAYER_METRICS", _bool, True)


def settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings read from `environ`, or from the process environment."""
    return Settings(environ)
