"""Scheme names derived from kernel configs and weights, not from checkpoint names."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from gemmguard.inventory.report import scheme_of


def _fp8_kernel(row: int, col: int, dtype: torch.dtype = torch.float8_e4m3fn) -> object:
    group = SimpleNamespace(row=row, col=col)
    key = SimpleNamespace(dtype=dtype, scale=SimpleNamespace(group_shape=group))
    return SimpleNamespace(config=SimpleNamespace(weight_quant_key=key))


def test_fp8_schemes_follow_the_weight_scale_group_shape() -> None:
    assert scheme_of(_fp8_kernel(128, 128), None) == "fp8-block"
    assert scheme_of(_fp8_kernel(-1, -1), None) == "fp8-tensor"
    assert scheme_of(_fp8_kernel(1, -1), None) == "fp8-channel"
    assert scheme_of(_fp8_kernel(1, -1, torch.int8), None) == "int8-channel"


def test_unquantized_scheme_is_the_weight_dtype() -> None:
    assert scheme_of(None, torch.empty(0, dtype=torch.bfloat16)) == "unquantized-bf16"
    assert scheme_of(None, torch.empty(0, dtype=torch.float16)) == "unquantized-fp16"


def test_real_vllm_fp8_block_key_is_named_fp8_block() -> None:
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        GroupShape,
        create_fp8_quant_key,
    )

    key = create_fp8_quant_key(static=True, group_shape=GroupShape(128, 128))
    kernel = SimpleNamespace(config=SimpleNamespace(weight_quant_key=key))
    assert scheme_of(kernel, None) == "fp8-block"


def test_linear_row_names_the_scheme_of_a_method_without_a_kernel_object() -> None:
    """vLLM 0.26's NVFP4 scheme keeps a backend string and no kernel: named from the layer."""
    from gemmguard.inventory import report

    holder = type("CompressedTensorsW4A4Fp4", (), {"backend": "marlin"})()
    module = SimpleNamespace(
        scheme=holder, quant_method=SimpleNamespace(apply=lambda *a: None),
        weight_packed=torch.zeros(4, 8, dtype=torch.uint8),
        weight_scale=torch.zeros(4, 1, dtype=torch.float8_e4m3fn))
    assert report.linear_row("l", module, "linear")["scheme"] == "nvfp4"


def test_moe_row_names_the_preferred_experts_and_those_turned_down_with_reasons() -> None:
    """The oracle's attempts are found through the config the layer's quant method keeps."""
    from gemmguard.inventory import report, selection

    config = object()
    selection.check_moe_candidate(type("X86CPUUnquantizedExperts", (), {}), config,
                                  lambda: (False, "kernel does not support current device cpu"))
    selection.check_moe_candidate(type("CPUUnquantizedExperts", (), {}), config,
                                  lambda: (True, None))
    experts = type("CPUUnquantizedExperts", (), {})()
    method = SimpleNamespace(moe=config, unquantized_backend=SimpleNamespace(value="CPU"),
                             moe_kernel=SimpleNamespace(fused_experts=experts))
    module = SimpleNamespace(quant_method=method,
                             w13_weight=torch.zeros(2, 8, 4, dtype=torch.bfloat16))
    row = report.moe_row("model.layers.0.mlp.experts", module)
    assert row["kernel"] == "CPUUnquantizedExperts" and row["backend"] == "CPU"
    assert row["scheme"] == "unquantized-bf16"
    assert row["preferred"] == "X86CPUUnquantizedExperts"
    assert row["turned_down"] == [{"kernel": "X86CPUUnquantizedExperts", "accepted": False,
                                   "reason": "kernel does not support current device cpu"}]
    # A layer whose choice was not seen has no turned-down list, not another layer's.
    other = SimpleNamespace(quant_method=SimpleNamespace(**{**vars(method), "moe": object()}),
                            w13_weight=module.w13_weight)
    assert report.moe_row("model.layers.1.mlp.experts", other)["turned_down"] == []
