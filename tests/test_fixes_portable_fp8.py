"""Fix 6: an FP8 block-scaled kernel for every platform, vLLM's own or gemmguard's portable one."""

from __future__ import annotations

from typing import Any

import pytest

from gemmguard import ledger, vllm_adapter
from gemmguard.config import Settings
from gemmguard.fixes import Changes, portable_fp8
from gemmguard.kernels.portable_fp8_block import PORTABLE_KERNEL_NAMES
from gemmguard.vllm_adapter import fixes as engine
from helpers import simulate


@pytest.fixture
def lists(monkeypatch: pytest.MonkeyPatch) -> Any:
    """vLLM's FP8 block candidate lists, without gemmguard's kernels; restored afterwards."""
    lists = vllm_adapter.candidate_lists("fp8_block")
    for platform in type(next(iter(lists))):
        own = [k for k in lists.get(platform, []) if k.__name__ not in PORTABLE_KERNEL_NAMES]
        monkeypatch.setitem(lists, platform, own)
    monkeypatch.setattr(ledger, "_APPLIED", {})
    return lists


def choose() -> type:
    """The kernel vLLM would give an FP8 block-scaled linear layer here."""
    module = engine.linear_kernels_module()
    return module.choose_scaled_mm_linear_kernel(  # type: ignore[no-any-return]
        engine.fp8_block_config(), vllm_adapter.candidate_lists("fp8_block"),
        quantization="fp8_block_w8a8",
    )


def amx() -> bool:
    return bool(portable_fp8.usable_kernels(include_portable=False)[0])


def test_without_amx_vllm_cpu_has_no_fp8_block_kernel_until_patched(lists: Any) -> None:
    if amx():
        pytest.skip("this CPU has AMX: vLLM's own CPU kernel takes FP8 block layers")
    finding = portable_fp8.detect()
    assert finding.state == "missing" and "requires AMX" in finding.detail
    with pytest.raises(ValueError, match="Failed to find a kernel"):  # the fix taken away
        choose()
    assert "PortableFp8BlockDequantKernel" in portable_fp8.patch(Settings({}), finding, Changes())
    assert choose().__name__ == "PortableFp8BlockDequantKernel"
    assert "portable-fp8-block-kernels" in [p.name for p in ledger.applied()]
    assert portable_fp8.detect().state == "missing"  # detect() speaks for vLLM alone


def test_a_platform_with_its_own_kernel_is_upstream(
    lists: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    simulate.clear_caches()
    simulate.cuda(monkeypatch, 90)  # Hopper: CUTLASS block FP8
    finding = portable_fp8.detect()
    simulate.clear_caches()
    assert finding.state == "upstream"
    assert "CutlassFp8BlockScaledMMKernel" in finding.detail


def test_faulty_test_kernels_are_not_counted_as_vllm_kernels(lists: Any) -> None:
    if amx():
        pytest.skip("this CPU has AMX: vLLM's own CPU kernel takes FP8 block layers")
    from gemmguard.plugin import add_portable_kernels

    add_portable_kernels(("e8m0", "garbage", "corrupt-block"))  # as GEMMGUARD_TEST_KERNELS does
    first = vllm_adapter.candidate_lists("fp8_block")[engine.platform()._enum][0]
    assert first.__name__ == "E8M0RequantFp8BlockKernel"  # first in line, and usable here
    finding = portable_fp8.detect()
    assert finding.state == "missing" and "E8M0" not in finding.detail
    assert portable_fp8.verify(Settings({})).detail == (
        "PortableFp8BlockDequantKernel takes FP8 block layers")


def test_an_undone_patch_leaves_the_candidate_lists_as_found(lists: Any) -> None:
    before = {platform: list(kernels) for platform, kernels in lists.items()}
    changes = Changes()
    portable_fp8.patch(Settings({}), portable_fp8.detect(), changes)
    assert any(k.__name__ in PORTABLE_KERNEL_NAMES for k in lists[engine.platform()._enum])
    changes.undo()
    assert {platform: list(kernels) for platform, kernels in lists.items()} == before
    assert "portable-fp8-block-kernels" not in [p.name for p in ledger.applied()]
