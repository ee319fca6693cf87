"""vLLM finds gemmguard's plugins through entry points (vLLM logs and swallows load errors)."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

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


# In a fresh interpreter, as the API server process of `gemmguard serve` runs: defer (or not),
# let vLLM build its serve parser (which loads the general plugins), then report what is installed.
API_PROCESS = """
import json, sys
from gemmguard import ledger, plugin
if sys.argv[1] == "defer":
    plugin.defer()
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser
AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
at_parser = [p.name for p in ledger.applied()]
hooks_at_parser = "gemmguard.selfcheck.load_check" in sys.modules
plugin.ensure_registered()
print(json.dumps({"at_parser": at_parser, "hooks_at_parser": hooks_at_parser,
                  "later": [p.name for p in ledger.applied()]}))
"""


def _api_process(mode: str, **env: str) -> dict[str, object]:
    import json
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", API_PROCESS, mode],
        env={**os.environ, "VLLM_PLUGINS": "gemmguard", **env},
        capture_output=True, text=True, timeout=300, check=True,
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_the_api_server_process_installs_nothing_while_vllm_builds_its_parser() -> None:
    deferred = _api_process("defer", VLLM_WORKER_MULTIPROC_METHOD="spawn")
    assert deferred["at_parser"] == [] and deferred["hooks_at_parser"] is False
    # Under fork nothing is deferred: a forked engine inherits vLLM's "plugins loaded" and would
    # never install gemmguard's hooks. That is also the full install to compare with.
    forked = _api_process("defer", VLLM_WORKER_MULTIPROC_METHOD="fork")
    assert forked["hooks_at_parser"] is True
    assert plugin.PORTABLE_KERNELS_PATCH.name in forked["at_parser"]  # type: ignore[operator]
    # Asked later (its build info), the deferring process installs the same patches.
    assert deferred["later"] == forked["at_parser"] == forked["later"]


@pytest.mark.parametrize(("env", "deferred"), [
    ({}, True),
    ({"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}, True),
    ({"VLLM_WORKER_MULTIPROC_METHOD": "fork"}, False),  # forked engines inherit the deferral
    ({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, False),  # the engine runs in this very process
])
def test_defer_holds_back_only_where_no_engine_runs_in_or_forks_from_this_process(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], deferred: bool,
) -> None:
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(plugin, "_DEFERRED", False)  # restored after the test
    plugin.defer()
    assert plugin._DEFERRED is deferred
