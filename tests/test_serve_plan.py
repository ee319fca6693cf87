"""`gemmguard serve` planning: gemmguard's options split from vLLM's, read as vLLM reads them."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import busy_port, free_port
from gemmguard import serve_plan, vllm_adapter
from gemmguard.demo import write_demo_model
from gemmguard.errors import ServeError, UsageError
from gemmguard.serve_plan import plan_serve
from gemmguard.worker import EXTENSION_CLS


def _plan(argv: list[str], tmp_path: Path, **env: str):  # type: ignore[no-untyped-def]
    return plan_serve(argv, {"GEMMGUARD_CACHE_DIR": str(tmp_path), **env})


def test_no_model_serves_the_demo_under_a_short_name(tmp_path: Path) -> None:
    plan = _plan(["--port", str(free_port())], tmp_path)
    assert plan.is_demo and plan.demo_scheme == "fp8-block"
    assert plan.model.startswith(str(tmp_path))
    assert plan.served_name == "gemmguard-demo"
    assert plan.vllm_args[-4:-2] == ["--served-model-name", "gemmguard-demo"]


def test_plugins_worker_extension_and_cpu_defaults_are_set(tmp_path: Path) -> None:
    plan = _plan(["--port", str(free_port())], tmp_path, VLLM_PLUGINS="my_plugin")
    assert plan.env["VLLM_PLUGINS"] == "my_plugin,gemmguard,gemmguard_api"
    assert plan.vllm_args[-2:] == ["--worker-extension-cls", EXTENSION_CLS]
    assert plan.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    kept = _plan(["--port", str(free_port())], tmp_path, VLLM_CPU_KVCACHE_SPACE="3")
    assert kept.env["VLLM_CPU_KVCACHE_SPACE"] == "3"


def test_vllms_own_plugins_stay_enabled_by_default(tmp_path: Path) -> None:
    plan = _plan(["--port", str(free_port())], tmp_path)
    assert plan.env["VLLM_PLUGINS"].split(",") == [
        "lora_filesystem_resolver", "lora_hf_hub_resolver", "gemmguard", "gemmguard_api"]


def test_gemmguard_options_become_settings_and_vllm_options_pass_through(tmp_path: Path) -> None:
    model = write_demo_model(tmp_path / "m")
    plan = _plan(
        [str(model), "--deny-kernel", "A", "--max-model-len", "512", "--deny-kernel", "B",
         "--no-per-layer-metrics", "--port", str(free_port())],
        tmp_path,
    )
    assert plan.model == str(model) and not plan.is_demo
    assert plan.env["GEMMGUARD_DENY_KERNELS"] == "A,B"
    assert plan.env["VLLM_DISABLED_KERNELS"] == "A,B"
    assert plan.env["GEMMGUARD_PER_LAYER_METRICS"] == "0"
    assert plan.vllm_args[:2] == ["--max-model-len", "512"]
    assert "--deny-kernel" not in plan.vllm_args


def test_model_may_be_given_with_the_model_option(tmp_path: Path) -> None:
    model = write_demo_model(tmp_path / "m")
    plan = _plan(["--model", str(model), "--port", str(free_port())], tmp_path)
    assert plan.model == str(model)
    assert "--model" not in plan.vllm_args


def test_missing_model_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ServeError, match="does not exist"):
        _plan([str(tmp_path / "nope")], tmp_path)
    with pytest.raises(ServeError, match="no config.json"):
        _plan([str(tmp_path)], tmp_path)


def test_port_in_use_is_an_error(tmp_path: Path) -> None:
    with busy_port() as port:
        with pytest.raises(ServeError, match=f"Port {port} on 127.0.0.1 is already in use"):
            _plan(["--host", "127.0.0.1", "--port", str(port)], tmp_path)


def test_worker_extension_is_gemmguards_own(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="worker-extension-cls"):
        _plan(["--worker-extension-cls", "x.Y"], tmp_path)


def test_a_config_file_sets_the_port_the_check_tests(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    with busy_port() as port:
        config.write_text(f"host: 127.0.0.1\nport: {port}\n")
        with pytest.raises(ServeError, match=f"Port {port} on 127.0.0.1 is already in use"):
            _plan(["--config", str(config)], tmp_path)
        free = free_port()  # the command line wins over the file, as in vLLM
        plan = _plan(["--config", str(config), "--port", str(free)], tmp_path)
    assert plan.port == free and plan.base_url == f"http://127.0.0.1:{free}"
    config.write_text(f"port: {free}\nmax_model_len: 512\n")
    assert _plan(["--config", str(config)], tmp_path).port == free


def test_underscore_spellings_are_read_as_vllm_reads_them(tmp_path: Path) -> None:
    with busy_port() as port:
        with pytest.raises(ServeError, match=f"Port {port} on 127.0.0.1 is already in use"):
            _plan(["--max_model_len", "512", "--host", "127.0.0.1", "--port", str(port)],
                  tmp_path)
    model = write_demo_model(tmp_path / "m")
    plan = _plan([str(model), "--max_model_len", "512", "--served_model_name", "mine",
                  "--port", str(free_port())], tmp_path)
    assert plan.served_name == "mine" and plan.vllm_args[:2] == ["--max_model_len", "512"]


def test_a_worker_extension_in_a_config_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("worker_extension_cls: x.Y\n")
    with pytest.raises(UsageError, match="worker-extension-cls is set by gemmguard serve"):
        _plan(["--config", str(config), "--port", str(free_port())], tmp_path)


def test_a_model_named_only_in_a_config_file_is_served_not_the_demo(tmp_path: Path) -> None:
    model = write_demo_model(tmp_path / "m")
    config = tmp_path / "serve.yaml"
    config.write_text(f"model: {model}\n")
    plan = _plan(["--config", str(config), "--port", str(free_port())], tmp_path)
    assert plan.model == str(model) and plan.demo_scheme is None and plan.served_name == str(model)
    config.write_text("max_model_len: 512\n")  # a file without a model: the demo, as before
    assert _plan(["--config", str(config), "--port", str(free_port())], tmp_path).demo_scheme


def test_a_start_on_a_vllm_gemmguard_did_not_run_on_says_so_before_vllm_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert serve_plan.vllm_note() == ""  # vllm-cpu 0.32.0: run here
    monkeypatch.setattr(vllm_adapter, "installed_vllm_version", lambda: "0.35.0")
    monkeypatch.setattr(vllm_adapter, "installed_vllm_distribution", lambda: "vllm")
    note = serve_plan.vllm_note()
    assert "vllm 0.35.0 is not a vLLM gemmguard was verified on" in note
    assert "vllm-cpu 0.32.0 (run)" in note and "hooks_missing" in note
    monkeypatch.setattr(vllm_adapter, "installed_vllm_version", lambda: "0.33.0")
    assert "verified from its source only" in serve_plan.vllm_note()
