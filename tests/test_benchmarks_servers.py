"""benchmarks.servers: the two servers are started alike, differ only by gemmguard, stop cleanly."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from benchmarks.servers import (
    PLAIN_VLLM_PLUGINS,
    MemorySampler,
    Server,
    ServerSpec,
    StartupError,
    root_causes,
)

ARGS = ("--enforce-eager", "--max-model-len", "1024")


def test_both_servers_get_the_same_model_name_port_and_engine_options() -> None:
    gemmguard = ServerSpec("gemmguard", Path("/m"), ARGS, "x").command(8123)
    plain = ServerSpec("plain", Path("/m"), ARGS, "x").command(8123)
    assert gemmguard[1:5] == ["-m", "gemmguard.cli", "serve", "/m"]
    assert plain[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", "/m"]
    assert gemmguard[5:] == plain[5:] == ["--served-model-name", "bench", "--host", "127.0.0.1",
                                          "--port", "8123", *ARGS]


def test_plain_server_leaves_gemmguards_plugins_out_and_keeps_vllms() -> None:
    from gemmguard.launcher import VLLM_OWN_PLUGINS

    assert PLAIN_VLLM_PLUGINS.split(",") == list(VLLM_OWN_PLUGINS)
    base = {"VLLM_PLUGINS": "gemmguard,gemmguard_api", "HOME": "/root"}
    plain = ServerSpec("plain", Path("/m"), ARGS, "x").environment(base)
    gemmguard = ServerSpec("gemmguard", Path("/m"), ARGS, "x").environment(base)
    assert plain["VLLM_PLUGINS"] == PLAIN_VLLM_PLUGINS
    assert "VLLM_PLUGINS" not in gemmguard  # gemmguard serve builds its own allowlist
    assert plain["VLLM_CPU_KVCACHE_SPACE"] == gemmguard["VLLM_CPU_KVCACHE_SPACE"] == "1"
    kept = ServerSpec("plain", Path("/m"), ARGS, "x").environment({"VLLM_CPU_KVCACHE_SPACE": "2"})
    assert kept["VLLM_CPU_KVCACHE_SPACE"] == "2"


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="'vllm' is not one of gemmguard, plain"):
        ServerSpec("vllm", Path("/m"), ARGS, "x")


@dataclass(frozen=True)
class ScriptSpec(ServerSpec):
    """A 'server' that is a Python one-liner, to test process handling without vLLM."""

    script: str = ""

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-c", self.script]


def script_server(tmp_path: Path, script: str) -> Server:
    spec = ScriptSpec("plain", Path("/m"), (), "script", script=script)
    return Server(spec, tmp_path, sample_interval_s=0.1)


def test_a_server_that_exits_is_a_startup_error_with_its_log(tmp_path: Path) -> None:
    server = script_server(
        tmp_path, "print('(EngineCore) RuntimeError: operator torchvision::nms does not exist');"
        " print('no kernel for you'); raise SystemExit(3)")
    server.start()
    with pytest.raises(StartupError, match="exited with code 3") as caught:
        server.wait_until_serving(timeout_s=30)
    assert "no kernel for you" in caught.value.log_tail
    assert caught.value.causes == ["RuntimeError: operator torchvision::nms does not exist"]
    assert caught.value.log_path == str(server.log_path)
    server.stop()


def test_root_causes_are_the_distinct_exception_lines_in_order() -> None:
    log = ("INFO fine\n(EngineCore pid=1) ERROR ValueError: Failed to find a kernel\n"
           "Traceback (most recent call last):\nValueError: Failed to find a kernel\n"
           "RuntimeError: Engine core initialization failed.\n")
    assert root_causes(log) == ["ValueError: Failed to find a kernel",
                                "RuntimeError: Engine core initialization failed."]


def test_stop_ends_the_whole_tree_and_memory_covers_it(tmp_path: Path) -> None:
    child = "import time; time.sleep(120)"
    server = script_server(
        tmp_path,
        f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); "
        "time.sleep(120)")
    server.start()
    assert server.process is not None
    deadline = time.monotonic() + 20
    while len(psutil.Process(server.process.pid).children()) < 1:
        assert time.monotonic() < deadline, "the script did not start its child"
        time.sleep(0.1)
    memory = server.memory()
    assert memory["max_processes"] == 2 and memory["tree_rss_bytes"] > 0
    assert sum(memory["rss_bytes_by_role"].values()) >= memory["tree_rss_bytes"] / 2
    children = psutil.Process(server.process.pid).children()
    server.stop()
    assert server.process.poll() is not None
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []


def test_sampler_records_when_each_process_started() -> None:
    sampler = MemorySampler(psutil.Process().pid, 1.0)
    sampler.sample()
    started = sampler.started(since_epoch=psutil.Process().create_time() - 1.0)
    assert list(started.values()) == [pytest.approx(1.0, abs=0.05)]
    assert sampler.cpu_seconds() > 0
