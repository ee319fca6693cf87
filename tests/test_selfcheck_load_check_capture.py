"""The check around one layer's post-processing: what it samples before vLLM touches the weights."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from vllm.model_executor.layers.quantization.utils import quant_utils

from gemmguard.selfcheck import load_check
from test_selfcheck_schemes import ALL, K, Layer, N, _gen


def test_a_method_without_a_kernel_object_is_sampled_by_the_scheme_its_layer_names() -> None:
    # vLLM 0.26's GPTQ (exllama) method calls its op directly: no kernel object to read.
    codes = torch.randint(0, 16, (K, N), generator=_gen(7), dtype=torch.int32)
    scale = torch.rand(K // 128, N, generator=_gen(9)).half() + 0.01
    config = SimpleNamespace(weight_bits=4, group_size=128, desc_act=False, is_sym=True)
    method = type("GPTQLinearMethod", (), {"quant_config": config})()
    layer = Layer(quant_method=method, qweight=quant_utils.gptq_pack(codes, 4, K, N),
                  scales=scale)
    check = load_check.LayerCheck(load_check.RankCheck(), "l", layer, "linear", lambda m: None)
    taken = check._capture()
    assert taken.scheme == "w4a16-g128"
    expected = ((codes - 8).float() * scale.float().repeat_interleave(128, 0)).t()
    assert torch.equal(taken.weight, expected[taken.rows])
    assert ALL.numel() == N
