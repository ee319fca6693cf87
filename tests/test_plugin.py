"""vLLM finds gemmguard's plugins through entry points (vLLM logs and swallows load errors)."""

from __future__ import annotations

from importlib.metadata import entry_points

from gemmguard import plugin
from gemmguard.endpoints import PLUGIN_NAME


def test_general_plugin_entry_point_loads_and_is_idempotent() -> None:
    (entry,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "gemmguard"]
    register = entry.load()
    assert register is plugin.register
    register()
    register()  # vLLM calls it again in the same process; must not fail or double-apply


def test_endpoint_plugin_entry_point_builds_a_vllm_endpoint_plugin() -> None:
    from vllm.plugins.endpoint_plugins.interface import EndpointPlugin

    (entry,) = [e for e in entry_points(group="vllm.endpoint_plugins") if e.name == PLUGIN_NAME]
    instance = entry.load()()
    assert isinstance(instance, EndpointPlugin)
    assert instance.name == PLUGIN_NAME


def test_vllm_loads_the_general_plugin_when_allowlisted(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from vllm.plugins import load_plugins_by_group

    monkeypatch.setenv("VLLM_PLUGINS", "gemmguard")
    loaded = load_plugins_by_group("vllm.general_plugins")
    assert loaded == {"gemmguard": plugin.register}
