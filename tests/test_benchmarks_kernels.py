"""benchmarks.kernels: the shapes timed, and that the timed kernels compute what they should."""

from __future__ import annotations

import pytest
from benchmarks.kernels import KERNELS, demo_shapes, measure, shapes_for


def test_demo_shapes_are_the_fused_layers_vllm_runs() -> None:
    from gemmguard.demo import DemoSpec

    spec = DemoSpec()
    shapes = demo_shapes()
    heads = spec.num_attention_heads * spec.head_dim
    kv = spec.num_key_value_heads * spec.head_dim
    assert shapes["demo qkv_proj"] == (heads + 2 * kv, spec.hidden_size)
    assert shapes["demo gate_up_proj"] == (2 * spec.intermediate_size, spec.hidden_size)
    assert shapes["demo down_proj"] == (spec.hidden_size, spec.intermediate_size)
    assert all(n % 128 == 0 and k % 128 == 0 for n, k in shapes.values())


def test_shape_sets() -> None:
    assert shapes_for(["4096"]) == {"4096x4096": (4096, 4096)}
    assert len(shapes_for(["demo", "4096"])) == 5
    with pytest.raises(ValueError, match="'8192' is not known; use demo or 4096"):
        shapes_for(["8192"])


def test_measure_times_both_kernels_and_the_dequant_one_equals_f_linear() -> None:
    found = measure({"tiny": (256, 128)}, tokens=[1, 3], repeats=1, min_time_s=0.001)
    assert [r["tokens"] for r in found["rows"]] == [1, 3]
    for row in found["rows"]:
        assert set(row["seconds"]) == {"bf16_linear", *KERNELS}
        assert all(v > 0 for v in row["seconds"].values())
        assert set(row["ratio_vs_bf16"]) == set(KERNELS)
        assert row["dequant_max_abs_diff"] == 0.0
