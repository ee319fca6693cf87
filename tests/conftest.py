"""Shared fixtures: real `gemmguard serve` processes on loopback, per test module or shared."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

# Engine start-up on 2 cores takes 30–90 s; a start that takes longer is a failure.
START_TIMEOUT_S = float(os.environ.get("GEMMGUARD_TEST_START_TIMEOUT", "360"))
# Options that make start-up fast on CI's CPU without changing what is tested.
FAST_ENGINE_ARGS = ("--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "8")


def tool(name: str) -> str:
    """A CLI tool from PATH or beside this Python (.venv/bin); fails, never skips, if absent."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(
            f"'{name}' is not on PATH. Install it with `make tools` "
            "(scripts/install-tools.sh .venv/bin) and run the tests through `make test`, "
            "which puts .venv/bin first on PATH.",
            pytrace=False,
        )
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def busy_port() -> Iterator[int]:
    """A loopback port some other server is listening on, for as long as the block runs."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield int(busy.getsockname()[1])


@dataclass
class Server:
    """A running `gemmguard serve` process and how to reach it."""

    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, **kwargs: object) -> requests.Response:
        return requests.get(self.base_url + path, timeout=60, **kwargs)  # type: ignore[arg-type]

    def post(self, path: str, **kwargs: object) -> requests.Response:
        return requests.post(self.base_url + path, timeout=120, **kwargs)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_server(
    args: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    wait_path: str = "/gemmguard/ready",
    engine_starts: int = 1,
) -> Server:
    """Start `gemmguard serve ARGS` on a free loopback port and wait until `wait_path` is 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "gemmguard.cli", "serve", *args,
           "--host", "127.0.0.1", "--port", str(port)]
    full_env = {**os.environ, **(env or {})}
    with log_path.open("wb") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    timeout = START_TIMEOUT_S * engine_starts
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"gemmguard serve exited with {process.returncode} before it was ready:\n"
                + server.log()[-6000:]
            )
        try:
            if requests.get(server.base_url + wait_path, timeout=2).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(1)
    server.stop()
    raise AssertionError(
        f"gemmguard serve not ready in {timeout}s:\n{server.log()[-6000:]}")


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GEMMGUARD_CACHE_DIR shared by the session, so demo checkpoints are made once."""
    return tmp_path_factory.mktemp("gemmguard-cache")


@pytest.fixture(scope="module")
def server_factory(
    tmp_path_factory: pytest.TempPathFactory, demo_cache: Path
) -> Iterator[Callable[..., Server]]:
    """Start servers for one module; all are stopped when the module ends."""
    started: list[Server] = []

    def factory(*args: str, env: dict[str, str] | None = None, fast: bool = True,
                engine_starts: int = 1) -> Server:
        log_path = tmp_path_factory.mktemp("serve") / "server.log"
        full_args = [*args, *(FAST_ENGINE_ARGS if fast else ())]
        server_env = {"GEMMGUARD_CACHE_DIR": str(demo_cache), **(env or {})}
        server = start_server(full_args, log_path, server_env, engine_starts=engine_starts)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def shared_server(
    tmp_path_factory: pytest.TempPathFactory, demo_cache: Path
) -> Iterator[Callable[..., Server]]:
    """A server several modules start with the same options, started once per session.

    An engine start costs about a minute on CI's two cores. Only for tests that leave the
    server as they found it: no signals, no state counted from zero, no options of their own.
    """
    servers: dict[tuple[str, ...], Server] = {}

    def factory(*args: str) -> Server:
        server = servers.get(args)
        if server is not None and server.process.poll() is not None:
            raise AssertionError(f"the shared server {args} exited with "
                                 f"{server.process.returncode}:\n{server.log()[-6000:]}")
        if server is None:
            log_path = tmp_path_factory.mktemp("shared-serve") / "server.log"
            server = start_server([*args, *FAST_ENGINE_ARGS], log_path,
                                  {"GEMMGUARD_CACHE_DIR": str(demo_cache)})
            servers[args] = server
        return server

    yield factory
    for server in servers.values():
        server.stop()


# Modules that use `shared_server` run last, one after another: its servers then idle through
# no other module's engine starts (memory), and none is started twice.
SHARED_SERVER_MODULES = ("test_e2e_inventory", "test_e2e_serve", "test_eval_harness",
                         "test_eval_kernel_swap")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.stem in SHARED_SERVER_MODULES)  # stable
