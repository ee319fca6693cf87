"""gemmguard's runtime settings: GEMMGUARD_* environment variables, strictly cast.

`gemmguard serve` turns its options into these variables so that every vLLM process
(API servers, engine core, workers) and a restarted engine see the same settings.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

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


    # What a failing self-check does: warn (serve and report), fallback (replace the layer's
    # kernel in place with the fastest passing candidate) or fail (refuse to start).
    @property
    def selfcheck_policy(self) -> str:
        return self.get("SELFCHECK_POLICY", _choice(POLICIES), "fallback")

    # What an incomplete self-check (layers it cannot check) does: allow, warn or fail.
    @property
    def selfcheck_unchecked(self) -> str:
        return self.get("SELFCHECK_UNCHECKED", _choice(UNCHECKED_POLICIES), "warn")

    # Where a refusing engine leaves its report for `gemmguard serve` (set by it; default none).
    @property
    def selfcheck_report_file(self) -> str:
        return self.get("SELFCHECK_REPORT_FILE", str, "")

    # Seconds without a finished request before a canary generation is sent (0: no canary).
    @property
    def canary_interval(self) -> float:
        return self.get("CANARY_INTERVAL", _seconds, 30.0)

    # Seconds a canary may take before the engine counts as not live.
    @property
    def canary_deadline(self) -> float:
        return self.get("CANARY_DEADLINE", _seconds, 10.0)

    # The canary's prompt (one greedy token is generated from it).
    @property
    def canary_prompt(self) -> str:
        return self.get("CANARY_PROMPT", str, "Hi")

    # Model types DeepGEMM is forced back on for despite the Blackwell exclusion ("*": all).
    @property
    def deepgemm_force(self) -> tuple[str, ...]:
        return self.get("DEEPGEMM_FORCE", _csv, ())

    # Extra DeepGEMM known-bad entries, "model_type:family[/family]" (e.g. glm4_moe:100/120).
    @property
    def deepgemm_exclude(self) -> tuple[Any, ...]:
        from gemmguard.fixes.deepgemm_table import parse_spec

        return self.get("DEEPGEMM_EXCLUDE", parse_spec, ())

    # Engine fixes to detect but not patch (fix names, or "all"; default: none).
    @property
    def fixes_disable(self) -> tuple[str, ...]:
        return self.get("FIXES_DISABLE", _csv, ())

    # Faulty test kernels put first in the FP8 block candidates (e8m0, garbage, corrupt-block).
    @property
    def test_kernels(self) -> tuple[str, ...]:
        return self.get("TEST_KERNELS", _test_kernels, ())

    # Directory whose counters outlive the process (canary failures, restarts, refusals); the
    # chart mounts a pod-lifetime emptyDir there. Default: none, counters start at 0.
    @property
    def state_dir(self) -> Path | None:
        return self.get("STATE_DIR", Path, None)

    # Seconds `gemmguard serve` keeps answering /metrics and the report after the self-check
    # refused to serve, before it exits 3 (default 0: exit at once).
    @property
    def selfcheck_refusal_linger(self) -> float:
        return self.get("SELFCHECK_REFUSAL_LINGER", _seconds, 0.0)


def _seconds(value: str) -> float:
    seconds = float(value)
    if seconds < 0:
        raise ValueError("expected a number of seconds ≥ 0")
    return seconds


POLICIES = ("warn", "fallback", "fail")
UNCHECKED_POLICIES = ("allow", "warn", "fail")


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def cast(value: str) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return cast


def _test_kernels(value: str) -> tuple[str, ...]:
    from gemmguard.kernels.faulty import FAULTY_KERNELS

    names = _csv(value)
    unknown = [n for n in names if n not in FAULTY_KERNELS]
    if unknown:
        raise ValueError(f"unknown {unknown}; known: {', '.join(FAULTY_KERNELS)}")
    return names


def settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings read from `environ`, or from the process environment."""
    return Settings(environ)
