"""Fix 1: DeepGEMM exclusion on a simulated Blackwell: the table, its gates, opt-in, data."""

from __future__ import annotations

import copy
import types
from collections.abc import Iterator
from typing import Any

import pytest

from gemmguard import ledger
from gemmguard.config import Settings
from gemmguard.fixes import Changes, Finding, FixNotPatchable, deepgemm_blackwell, probe
from gemmguard.vllm_adapter import fixes as engine
from helpers import simulate

EXCLUDED = "qwen3_5_text"
EXCLUDED_MOE = "qwen3_5_moe_text"


@pytest.fixture
def dg(monkeypatch: pytest.MonkeyPatch) -> Any:
    """vllm.utils.deep_gemm with a private copy of the table (in-place edits are undone)."""
    module = engine.deep_gemm_module()
    monkeypatch.setattr(module, engine.EXCLUSION_TABLE,
                        copy.copy(getattr(module, engine.EXCLUSION_TABLE)))
    oracle = engine.fp8_moe_oracle()
    monkeypatch.setattr(oracle, "_get_priority_backends", oracle._get_priority_backends)
    monkeypatch.setattr(ledger, "_APPLIED", {})
    return module


def simulated_cuda(monkeypatch: pytest.MonkeyPatch, capability: int) -> Iterator[None]:
    simulate.clear_caches()
    simulate.cuda(monkeypatch, capability)
    yield
    simulate.clear_caches()


@pytest.fixture
def blackwell(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    yield from simulated_cuda(monkeypatch, 100)


@pytest.fixture
def hopper(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    yield from simulated_cuda(monkeypatch, 90)


def model(monkeypatch: pytest.MonkeyPatch, model_type: str) -> None:
    """Make `model_type` the model vLLM is building (what kernels and oracles read)."""
    import vllm.config.vllm as config_module

    monkeypatch.setattr(config_module, "_current_vllm_config", probe.stub_vllm_config(model_type))


def linear_reason(model_type: str, monkeypatch: pytest.MonkeyPatch) -> str | None:
    model(monkeypatch, model_type)
    kernel = engine.deep_gemm_linear_kernel()
    assert kernel is not None
    return kernel.can_implement(engine.fp8_block_config())[1]  # type: ignore[no-any-return]


def moe_backend(monkeypatch: pytest.MonkeyPatch, model_type: str) -> Any:
    """The real FP8 MoE oracle, with only DeepGEMM and Triton expert classes available."""
    oracle = engine.fp8_moe_oracle()
    usable = {oracle.Fp8MoeBackend.DEEPGEMM, oracle.Fp8MoeBackend.TRITON}

    def kernel_cls(backend: Any) -> list[type]:
        ok = backend in usable
        return [type("Fake", (), {"is_supported_config": staticmethod(lambda *a: (ok, "fake"))})]

    monkeypatch.setattr(oracle, "backend_to_kernel_cls", kernel_cls)
    model(monkeypatch, model_type)
    parallel = types.SimpleNamespace(use_batched_activation_format=False,
                                     use_deepep_v2_kernels=False, ep_size=1)
    # Standard activations where each version asks (0.34: the MoE config's activation_format).
    config = types.SimpleNamespace(moe_backend="auto", moe_parallel_config=parallel,
                                   use_batched_activation_format=False,
                                   activation_format=types.SimpleNamespace(is_batched=False))
    return oracle.select_fp8_moe_backend(config, *engine.fp8_moe_keys())[0]


def apply(environ: dict[str, str] | None = None) -> str:
    finding = deepgemm_blackwell.detect()
    return deepgemm_blackwell.patch(Settings(environ or {}), finding, Changes())


def test_linear_gate_turns_deepgemm_down_for_excluded_models(
    dg: Any, blackwell: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert linear_reason(EXCLUDED, monkeypatch) == f"Should not use deepgemm for model {EXCLUDED}"
    assert "linear" not in deepgemm_blackwell.detect().missing_parts
    # Take the fix away: the kernel module's gate back to its pre-#37806 form.
    kernel_module = __import__(engine.deep_gemm_linear_kernel().__module__, fromlist=["_"])
    monkeypatch.setattr(kernel_module, engine.EXCLUSION_PREDICATE, lambda model_type: False)
    assert linear_reason(EXCLUDED, monkeypatch) != f"Should not use deepgemm for model {EXCLUDED}"
    assert "linear" in deepgemm_blackwell.detect().missing_parts


def test_without_a_table_the_fix_is_missing_and_not_patchable(
    dg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(dg, engine.EXCLUSION_TABLE)
    finding = deepgemm_blackwell.detect()
    assert finding.state == "missing" and "table" in finding.missing_parts
    with pytest.raises(FixNotPatchable, match="no working exclusion table"):
        deepgemm_blackwell.patch(Settings({}), finding, Changes())


def test_moe_probe_agrees_with_the_real_oracle_and_the_patch_covers_moe(
    dg: Any, blackwell: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "has_deep_gemm", lambda: True)  # "installed": the table stays
    before = moe_backend(monkeypatch, EXCLUDED_MOE)
    finding = deepgemm_blackwell.detect()
    assert ("moe" in finding.missing_parts) == (before.value == "DEEPGEMM"), finding.detail
    apply()
    assert moe_backend(monkeypatch, EXCLUDED_MOE).value == "TRITON"
    assert moe_backend(monkeypatch, "llama").value == "DEEPGEMM"
    monkeypatch.setenv("VLLM_MOE_USE_DEEP_GEMM", "1")  # an explicit choice stays the oracle's
    assert moe_backend(monkeypatch, EXCLUDED_MOE).value == "DEEPGEMM"
    monkeypatch.delenv("VLLM_MOE_USE_DEEP_GEMM")
    if before.value == "DEEPGEMM":  # 0.26/0.32: taking the patch off brings the bug back
        assert "deepgemm-moe-exclusion" in [p.name for p in ledger.applied()]
        oracle = engine.fp8_moe_oracle()
        monkeypatch.setattr(oracle, "_get_priority_backends",
                            oracle._get_priority_backends.__wrapped__)
        assert moe_backend(monkeypatch, EXCLUDED_MOE).value == "DEEPGEMM"


def test_opt_in_setting_brings_deepgemm_back_for_one_model(
    dg: Any, blackwell: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "has_deep_gemm", lambda: True)
    assert "opt_in" in deepgemm_blackwell.detect().missing_parts  # vLLM has no opt-in of its own
    apply({"GEMMGUARD_DEEPGEMM_FORCE": EXCLUDED})
    assert not dg.should_auto_disable_deep_gemm(EXCLUDED)
    assert dg.should_auto_disable_deep_gemm(EXCLUDED_MOE)  # only the named model type
    assert "Should not use deepgemm" not in str(linear_reason(EXCLUDED, monkeypatch))


def test_explicit_vllm_use_deep_gemm_forces_every_model(
    dg: Any, blackwell: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "has_deep_gemm", lambda: True)
    monkeypatch.setenv("VLLM_USE_DEEP_GEMM", "1")
    assert "forced on" in apply()
    assert not dg.should_auto_disable_deep_gemm(EXCLUDED)
    assert not dg.should_auto_disable_deep_gemm(EXCLUDED_MOE)


def test_no_auto_disable_warning_when_deepgemm_is_not_installed(
    dg: Any, blackwell: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not engine.has_deep_gemm()  # true of this box; the config hook would still warn:
    assert dg.should_auto_disable_deep_gemm(EXCLUDED)
    assert "no_warning_without_deepgemm" in deepgemm_blackwell.detect().missing_parts
    assert "emptied" in apply()
    assert not dg.should_auto_disable_deep_gemm(EXCLUDED)


def test_known_bad_entries_extend_the_table_per_family(
    dg: Any, blackwell: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "has_deep_gemm", lambda: True)
    detail = apply({"GEMMGUARD_DEEPGEMM_EXCLUDE": "glm4_moe:100,only_sm12x:120"})
    assert dg.should_auto_disable_deep_gemm("glm4_moe")
    assert not dg.should_auto_disable_deep_gemm("only_sm12x")  # this device is SM10x
    assert linear_reason("glm4_moe", monkeypatch) == "Should not use deepgemm for model glm4_moe"
    if isinstance(getattr(dg, engine.EXCLUSION_TABLE), set):  # 0.26/0.32: no per-family table
        assert "only_sm12x" in detail


def test_known_bad_entries_do_not_reach_hopper(
    dg: Any, hopper: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "has_deep_gemm", lambda: True)
    apply({"GEMMGUARD_DEEPGEMM_EXCLUDE": "glm4_moe:100"})
    assert not dg.should_auto_disable_deep_gemm("glm4_moe")


def test_detect_leaves_vllm_unchanged(dg: Any) -> None:
    table = copy.copy(getattr(dg, engine.EXCLUSION_TABLE))
    oracle = engine.fp8_moe_oracle()
    before = (oracle._get_priority_backends, dg.should_auto_disable_deep_gemm)
    deepgemm_blackwell.detect()
    assert getattr(dg, engine.EXCLUSION_TABLE) == table
    assert (oracle._get_priority_backends, dg.should_auto_disable_deep_gemm) == before


def test_a_patch_that_refuses_leaves_the_table_untouched(
    dg: Any, blackwell: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "has_deep_gemm", lambda: True)
    table = copy.copy(getattr(dg, engine.EXCLUSION_TABLE))
    finding = deepgemm_blackwell.detect()
    undecided = Finding("missing", finding.detail, (*finding.missing_parts, "moe?"))
    changes = Changes()
    with pytest.raises(FixNotPatchable, match=r"\['moe\?'\] could not be probed"):
        deepgemm_blackwell.patch(Settings({"GEMMGUARD_DEEPGEMM_EXCLUDE": "glm4_moe:100"}),
                                 undecided, changes)
    assert getattr(dg, engine.EXCLUSION_TABLE) == table and len(changes) == 0
    assert ledger.applied() == []


def test_verify_sees_the_patch_and_its_undo(
    dg: Any, blackwell: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "has_deep_gemm", lambda: True)  # "installed": the table stays
    settings = Settings({"GEMMGUARD_DEEPGEMM_EXCLUDE": "glm4_moe:100"})
    table = copy.copy(getattr(dg, engine.EXCLUSION_TABLE))
    changes = Changes()
    deepgemm_blackwell.patch(settings, deepgemm_blackwell.detect(), changes)
    assert deepgemm_blackwell.verify(settings).state == "upstream"
    changes.undo()
    assert getattr(dg, engine.EXCLUSION_TABLE) == table
    after_undo = deepgemm_blackwell.verify(settings)
    assert after_undo.state == "missing" and "table: glm4_moe not excluded" in after_undo.detail


def test_the_registry_keeps_a_verified_patch(
    dg: Any, blackwell: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gemmguard.fixes as fixes

    monkeypatch.setattr(fixes, "_APPLIED", {})
    monkeypatch.setattr(fixes, "all_fixes", lambda: [deepgemm_blackwell.FIX])
    (row,) = fixes.apply_all(Settings({}))
    assert row["state"] == "patched", row["detail"]
    assert "emptied" in row["detail"]  # DeepGEMM is not installed on this box
    assert not dg.should_auto_disable_deep_gemm(EXCLUDED)
