"""GEMMGUARD_* settings: strict casts, defaults, and errors that say what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemmguard.config import settings
from gemmguard.errors import ConfigError


def test_defaults_when_unset() -> None:
    cfg = settings({})
    assert cfg.deny_kernels == ()
    assert cfg.per_layer_metrics is True


def test_values_are_cast() -> None:
    cfg = settings({
        "GEMMGUARD_DENY_KERNELS": " A, B ,,A",
        "GEMMGUARD_PER_LAYER_METRICS": "off",
        "GEMMGUARD_CACHE_DIR": "/x/y",
    })
    assert cfg.deny_kernels == ("A", "B", "A")
    assert cfg.per_layer_metrics is False
    assert cfg.cache_dir == Path("/x/y")


def test_bad_bool_names_the_variable_the_value_and_the_default() -> None:
    with pytest.raises(ConfigError) as err:
        _ = settings({"GEMMGUARD_PER_LAYER_METRICS": "maybe"}).per_layer_metrics
    message = str(err.value)
    assert "GEMMGUARD_PER_LAYER_METRICS" in message and "'maybe'" in message
    assert "default (True)" in message
