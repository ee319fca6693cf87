"""benchmarks.parser_plugins times what its arm names: gemmguard's plugin loaded, or none."""

from __future__ import annotations

import subprocess

import pytest
from benchmarks import parser_plugins


def test_the_gemmguard_arms_load_gemmguards_plugin_while_vllm_builds_its_parser() -> None:
    # one() raises if vLLM did not call the plugin's register (deferring, it still is called).
    assert parser_plugins.one("gemmguard") > 0
    assert parser_plugins.one("gemmguard", defer=True) > 0


def test_an_arm_whose_probe_did_not_load_what_it_names_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def probe_without_the_plugin(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 0, stdout="0.05 False\n", stderr="")

    monkeypatch.setattr(parser_plugins.subprocess, "run", probe_without_the_plugin)
    with pytest.raises(RuntimeError, match="gemmguard's plugin loaded: False"):
        parser_plugins.one("gemmguard")
    assert parser_plugins.one("none") == 0.05
