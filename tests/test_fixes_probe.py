"""Probe tools: run an engine function under stand-ins without changing the engine."""

from __future__ import annotations

import types

import torch

from gemmguard.fixes import probe

PLATFORM = "real"


def reads_platform() -> str:
    return PLATFORM


def imports_inside() -> object:
    from json import dumps  # resolved at call time: where the probe hooks in

    return dumps


class Holder:
    @classmethod
    def which(cls) -> str:
        return f"{cls.__name__}:{PLATFORM}"


def test_with_globals_replaces_names_for_the_copy_only() -> None:
    clone = probe.with_globals(reads_platform, {"PLATFORM": "simulated"})
    assert clone() == "simulated" and reads_platform() == "real"
    method = probe.with_globals(Holder.which, {"PLATFORM": "simulated"})
    assert method() == "Holder:simulated" and Holder.which() == "Holder:real"


def test_with_globals_can_stand_in_for_an_import() -> None:
    stand_in = types.SimpleNamespace(dumps="stand-in")
    clone = probe.with_globals(imports_inside, {}, imports={"json": stand_in})
    assert clone() == "stand-in"
    assert imports_inside() is __import__("json").dumps


def test_stub_platform_answers_like_vllms_predicates() -> None:
    b200 = probe.StubPlatform("cuda", 100)
    assert b200.is_cuda() and not b200.is_rocm()
    assert b200.is_device_capability_family(100) and not b200.is_device_capability_family(120)
    assert b200.has_device_capability((9, 0)) and not b200.is_device_capability(90)


def test_names_in_order_reads_calls_not_constants() -> None:
    def fn() -> None:
        "synchronize"  # a constant, not a call
        torch.accelerator.synchronize()

    names = [n for code in probe.names_in_order(fn) for n in code]
    assert names == ["torch", "accelerator", "synchronize"]


def test_fake_cuda_tensor_passes_is_cuda_checks() -> None:
    t = torch.ones(2, 3).as_subclass(probe.FakeCudaTensor)
    assert t.is_cuda and t.view(3, 2).is_cuda and t.device.type == "cpu"
