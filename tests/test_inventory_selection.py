"""Kernel-selection capture and the deny list, through vLLM's real chooser."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from gemmguard import ledger, vllm_adapter
from gemmguard.inventory import selection
from gemmguard.vllm_adapter import moe


class _Kernel:
    reason: str | None = None

    @classmethod
    def is_supported(cls, compute_capability: int | None = None) -> tuple[bool, str | None]:
        return cls.reason is None, cls.reason

    @classmethod
    def can_implement(cls, config: object) -> tuple[bool, str | None]:
        return True, None


class FirstKernel(_Kernel):
    pass


class UnsupportedKernel(_Kernel):
    reason = "requires a GPU this test does not have"


class LastKernel(_Kernel):
    pass


@pytest.fixture
def choose() -> Iterator[object]:
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.kernels import linear
    from vllm.platforms import current_platform

    selection.install(("FirstKernel",))
    candidates = {current_platform._enum: [FirstKernel, UnsupportedKernel, LastKernel]}

    def run(config: object) -> type:
        return linear.choose_scaled_mm_linear_kernel(  # type: ignore[no-any-return]
            config, candidates, quantization="fp8_block_w8a8"
        )

    with set_current_vllm_config(VllmConfig()):
        yield run
    selection.install(())


def test_denied_and_unsupported_candidates_are_recorded_with_reasons(choose) -> None:  # type: ignore[no-untyped-def]
    config = SimpleNamespace()
    assert choose(config) is LastKernel
    record = selection.selection_for_config(config)
    assert record is not None
    assert [(a.kernel, a.accepted) for a in record.attempts] == [
        ("FirstKernel", False), ("UnsupportedKernel", False), ("LastKernel", True)]
    assert record.turned_down[0].reason == selection.DENIED
    assert "requires a GPU this test does not have" in record.turned_down[1].reason


def test_without_the_deny_list_the_first_candidate_wins(choose) -> None:  # type: ignore[no-untyped-def]
    selection.install(())
    config = SimpleNamespace()
    assert choose(config) is FirstKernel
    record = selection.selection_for_config(config)
    assert record is not None and record.turned_down == []


def test_install_is_idempotent() -> None:
    from vllm.model_executor.kernels import linear

    selection.install(())
    wrapped = linear.choose_scaled_mm_linear_kernel
    selection.install(())
    assert linear.choose_scaled_mm_linear_kernel is wrapped
    assert not hasattr(wrapped.__gemmguard_wrapped__, "__gemmguard_wrapped__")


def test_cpu_gemm_names_come_from_the_function_vllm_stored() -> None:
    import torch

    assert selection.cpu_gemm_name(lambda x, w, b: torch.nn.functional.linear(x, w, b)) == (
        "torch.nn.functional.linear")
    ops = SimpleNamespace(onednn_mm=None)
    assert selection.cpu_gemm_name(lambda x, w, b: ops.onednn_mm(None, x, b)) == "onednn_mm"


def test_moe_checks_are_recorded_per_config_and_denials_answered_without_asking() -> None:
    selection.install(("DeniedExperts",))
    asked: list[str] = []

    def ask(name: str, answer: tuple[bool, str | None]):  # type: ignore[no-untyped-def]
        return lambda: asked.append(name) or answer

    first, second = object(), object()
    denied, slow, good = (type(n, (), {}) for n in ("DeniedExperts", "SlowExperts", "GoodExperts"))
    try:
        assert selection.check_moe_candidate(denied, first, ask("denied", (True, None))) == (
            False, selection.DENIED)
        assert selection.check_moe_candidate(slow, second, ask("slow", (False, " no AMX "))) == (
            False, " no AMX ")
        assert selection.check_moe_candidate(good, first, ask("good", (True, None))) == (
            True, None)
    finally:
        selection.install(())
    assert asked == ["slow", "good"]
    record = selection.selection_for_moe_config(first)
    assert record is not None
    assert [a.as_dict() for a in record.attempts] == [
        {"kernel": "DeniedExperts", "accepted": False, "reason": selection.DENIED},
        {"kernel": "GoodExperts", "accepted": True, "reason": ""}]
    other = selection.selection_for_moe_config(second)
    assert other is not None and [(a.kernel, a.reason) for a in other.turned_down] == [
        ("SlowExperts", "no AMX")]
    # The oracle stops at the first supported class: a question after it starts a new choice.
    selection.check_moe_candidate(slow, first, lambda: (True, None))
    again = selection.selection_for_moe_config(first)
    assert again is not None and [a.kernel for a in again.attempts] == ["SlowExperts"]


@pytest.fixture
def bare_vllm(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A vLLM with its linear choosers and nothing else where gemmguard looks: install() runs
    afresh against it, with an empty list of missing hooks."""
    chooser = SimpleNamespace(is_supported_and_can_implement_kernel=lambda *a: (True, None),
                              choose_scaled_mm_linear_kernel=lambda *a: None)
    monkeypatch.setattr(selection, "_INSTALLED", False)
    monkeypatch.setattr(ledger, "_MISSING", {})
    monkeypatch.setattr(vllm_adapter, "linear_kernels_module", lambda: chooser)
    monkeypatch.setattr(vllm_adapter, "unquantized_cpu_dispatch_module", SimpleNamespace)
    return monkeypatch


def test_a_vllm_without_moe_oracles_is_said_not_to_have_the_moe_hook(
        bare_vllm: pytest.MonkeyPatch) -> None:
    # A vLLM whose MoE oracles moved: the linear choosers still wrap, the MoE hook is logged
    # and listed as missing (build info, gemmguard_hook_missing), not silently skipped.
    bare_vllm.setattr(moe, "check_moe_candidates", lambda check: False)
    selection.install()
    assert "kernel-selection-capture:moe" in ledger.missing()
    assert "--deny-kernel does not reach experts" in ledger.missing()[
        "kernel-selection-capture:moe"]


def test_a_cpu_build_without_the_unquantized_dispatch_says_so(
        bare_vllm: pytest.MonkeyPatch) -> None:
    bare_vllm.setattr(vllm_adapter, "is_cpu_build", lambda: True)
    bare_vllm.setattr(moe, "check_moe_candidates", lambda check: True)
    selection.install()
    assert list(ledger.missing()) == ["kernel-selection-capture:cpu-dispatch"]
