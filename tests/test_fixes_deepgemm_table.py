"""The DeepGEMM known-bad list: the packaged file, the operator's additions, strict errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemmguard.config import Settings
from gemmguard.errors import ConfigError
from gemmguard.fixes import deepgemm_table
from gemmguard.fixes.deepgemm_table import KnownBad


def test_packaged_list_holds_upstreams_entries_with_reasons() -> None:
    entries = {e.model_type: e for e in deepgemm_table.load_file()}
    assert entries["qwen3_5_text"].families == (100, 120)
    assert entries["qwen3_5_moe_text"].families == (100, 120)
    assert all(e.reason and e.kernel == "deep_gemm" for e in entries.values())


def test_operator_entries_are_added_to_the_packaged_ones() -> None:
    settings = Settings({"GEMMGUARD_DEEPGEMM_EXCLUDE": "glm4_moe:100/120, minimax_m2:120"})
    entries = deepgemm_table.known_bad(settings)
    assert KnownBad("glm4_moe", (100, 120)) in entries
    assert KnownBad("minimax_m2", (120,)) in entries
    assert len(entries) == len(deepgemm_table.load_file()) + 2


@pytest.mark.parametrize("value", ["glm4_moe", "glm4_moe:", "glm4_moe:sm100", ":100", "x:105"])
def test_a_bad_spec_names_the_variable_and_the_expected_form(value: str) -> None:
    with pytest.raises(ConfigError, match="GEMMGUARD_DEEPGEMM_EXCLUDE has value"):
        deepgemm_table.known_bad(Settings({"GEMMGUARD_DEEPGEMM_EXCLUDE": value}))


def test_a_file_entry_for_another_kernel_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    entry = {"model_type": "x", "families": [100], "kernel": "cutlass"}
    path.write_text(json.dumps({"entries": [entry]}))
    with pytest.raises(ConfigError, match="GEMMGUARD_DENY_KERNELS"):
        deepgemm_table.load_file(path)


def test_a_file_entry_with_an_unknown_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"entries": [{"model_type": "x", "families": [100], "famlies": 1}]}))
    with pytest.raises(ConfigError, match="unknown key"):
        deepgemm_table.load_file(path)


def test_forced_model_types_are_read_from_the_setting() -> None:
    assert deepgemm_table.forced(Settings({})) == frozenset()
    forced = deepgemm_table.forced(Settings({"GEMMGUARD_DEEPGEMM_FORCE": "a, b,"}))
    assert forced == {"a", "b"}


def test_a_missing_list_says_to_reinstall_with_package_data(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="package data"):
        deepgemm_table.load_file(tmp_path / "absent.json")
