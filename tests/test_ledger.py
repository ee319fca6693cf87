"""The ledger of runtime patches: what is applied, and, loudly, what could not attach."""

from __future__ import annotations

import logging

import pytest

from gemmguard import ledger


def test_a_hook_that_cannot_attach_is_logged_once_and_listed(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger, "_MISSING", {})
    # vLLM's logger does not propagate to the root, where caplog listens.
    monkeypatch.setattr(logging.getLogger("vllm"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="vllm.gemmguard"):
        ledger.record_missing("kernel-selection-capture:moe", "no MoE oracle")
        ledger.record_missing("kernel-selection-capture:moe", "no MoE oracle")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "hook kernel-selection-capture:moe could not attach" in warnings[0]
    assert "make contract-source" in warnings[0]
    assert ledger.missing() == {"kernel-selection-capture:moe": "no MoE oracle"}
