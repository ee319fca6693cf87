"""The servers the CPU benchmark compares: `gemmguard serve` and plain vLLM, on one checkpoint.

Plain vLLM is vLLM's own `serve` (through `benchmarks.vllm_cli`) with `VLLM_PLUGINS=none`, so no
gemmguard plugin loads; both get the same checkpoint, vLLM options and environment otherwise.
Each runs in a session of its own, so the one not being measured can be frozen (SIGSTOP): on a
few cores an idle CPU engine still takes cycles from the one under load.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from benchmarks import vllm_cli

SERVED_NAME = "bench"


@dataclass
class Server:
    """One running server, and how long its start took."""

    arm: str  # "gemmguard", "plain" or "plain-b"
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    launched: float = field(default_factory=time.monotonic)
    health_s: float | None = None
    ready_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, timeout=30)

    def wait_for(self, path: str, timeout_s: float) -> float:
        """Seconds from launch until `path` answers 200; fails if the server exits first."""
        deadline = self.launched + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"The {self.arm} server exited with {self.process.returncode} "
                                   f"before {path} answered; its log is {self.log_path}.")
            try:
                if requests.get(self.url + path, timeout=2).status_code == 200:
                    return time.monotonic() - self.launched
            except requests.RequestException:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"The {self.arm} server did not answer 200 on {path} within "
                           f"{timeout_s:.0f} s; its log is {self.log_path}.")

    def freeze(self, frozen: bool) -> None:
        os.killpg(self.process.pid, signal.SIGSTOP if frozen else signal.SIGCONT)

    def memory_mib(self) -> dict[str, float]:
        """RSS, USS and PSS summed over the server's process tree, in MiB."""
        root = psutil.Process(self.process.pid)
        total = {"rss": 0.0, "uss": 0.0, "pss": 0.0}
        for proc in [root, *root.children(recursive=True)]:
            info = proc.memory_full_info()
            for key in total:
                total[key] += getattr(info, key) / 2**20
        return total

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGCONT)  # a frozen server cannot exit
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start(arm: str, model: Path, port: int, engine_args: list[str], env: dict[str, str],
          log_dir: Path, timeout_s: float = 600) -> Server:
    """Launch one server and wait until it serves (gemmguard: until /gemmguard/ready too)."""
    common = [str(model), "--host", "127.0.0.1", "--port", str(port),
              "--served-model-name", SERVED_NAME, *engine_args]
    if arm == "gemmguard":
        cmd = [sys.executable, "-m", "gemmguard.cli", "serve", *common]
        arm_env = env  # gemmguard serve names its own plugins in VLLM_PLUGINS
    else:
        cmd = vllm_cli.command("serve", *common)
        arm_env = {**env, "VLLM_PLUGINS": "none"}
    log_path = log_dir / f"{arm}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=arm_env,
                                   start_new_session=True)
    server = Server(arm, process, port, log_path)
    try:
        server.health_s = server.wait_for("/health", timeout_s)
        if arm == "gemmguard":
            server.ready_s = server.wait_for("/gemmguard/ready", timeout_s)
    except RuntimeError:
        server.stop()
        raise
    return server
