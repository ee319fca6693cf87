"""The benchmark's sections, run in an order that keeps the machine as quiet as it can be.

1. kernels (issue 4), before any server is up;
2. request path: plain and gemmguard on the bf16 demo, both up, A/B rounds of the same load;
3. start-up: each server alone, per checkpoint, alternating which goes first; the fp8-block
   checkpoints for gemmguard alone (plain vLLM cannot load them on a CPU without AMX).
A section that fails is recorded as a problem and the others still run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import compare, load
from benchmarks.machine import HostLoad, own_cpu_seconds
from benchmarks.servers import SERVED_NAME, Server, ServerSpec, StartupError

Log = Callable[[str], None]

NO_AMX_REASON = ("plain vLLM cannot load FP8 block checkpoints on a CPU without AMX "
                 "(\"Failed to find a kernel … requires AMX\"); gemmguard's portable kernel is "
                 "what makes them load, so there is no plain baseline")


@dataclass(frozen=True)
class Checkpoint:
    """A demo checkpoint the benchmark writes with `gemmguard demo-model`."""

    name: str
    scheme: str
    layers: int
    hidden_size: int
    intermediate_size: int

    def cli_args(self, out: Path) -> list[str]:
        return ["--scheme", self.scheme, "--out", str(out), "--layers", str(self.layers),
                "--hidden-size", str(self.hidden_size),
                "--intermediate-size", str(self.intermediate_size)]


@dataclass(frozen=True)
class Options:
    """Everything a run depends on; recorded in the report as `settings`."""

    requests: int = 48
    concurrency: tuple[int, ...] = (1, 4, 16)
    rounds: int = 4
    max_tokens: int = 32
    prompt_len: int = 64
    startup_rounds: int = 2
    engine_args: tuple[str, ...] = ("--enforce-eager", "--max-model-len", "1024")
    # VLLM_CPU_OMP_THREADS_BIND for both servers ("auto" is vLLM's default); see cli.
    omp_threads_bind: str = "auto"
    large: tuple[int, int, int] = (8, 1024, 4096)
    skip_large: bool = False
    skip_fp8: bool = False
    skip_kernels: bool = False
    kernel_tokens: tuple[int, ...] = (1, 16, 128)
    kernel_threads: int = 1
    kernel_repeats: int = 5
    start_timeout_s: float = 600.0
    sample_interval_s: float = 1.0

    def checkpoints(self) -> list[Checkpoint]:
        layers, hidden, inter = self.large
        found = [Checkpoint("demo-bf16", "bf16", 2, 256, 512)]
        if not self.skip_fp8:
            found.append(Checkpoint("demo-fp8-block", "fp8-block", 2, 256, 512))
        if not self.skip_large:
            found.append(Checkpoint("large-bf16", "bf16", layers, hidden, inter))
            if not self.skip_fp8:
                found.append(Checkpoint("large-fp8-block", "fp8-block", layers, hidden, inter))
        return found

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


class Run:
    """One benchmark run: its workdir, its servers, its results and problems."""

    def __init__(self, options: Options, workdir: Path, log: Log = print) -> None:
        self.options = options
        self.workdir = workdir
        self.log = log
        self.models: dict[str, Path] = {}
        self.problems: list[dict[str, str]] = []
        self.live: list[Server] = []

    # --- helpers ------------------------------------------------------------------------

    def section(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one section; a failure becomes a recorded problem, never a lost report."""
        self.log(f"[bench] {name} …")
        start = time.perf_counter()
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 -- every failure is reported, then the rest runs
            self.problems.append(problem(name, exc))
            self.log(f"[bench] {name} failed: {str(exc)[:600]}")
            return None
        finally:
            self.log(f"[bench] {name} took {time.perf_counter() - start:.0f} s")

    def start(self, spec: ServerSpec) -> tuple[Server, dict[str, Any]]:
        server = Server(spec, self.workdir / "logs", self.options.sample_interval_s)
        host = HostLoad.begin(self.ours())
        self.live.append(server)
        server.start()
        try:
            startup = server.wait_until_serving(self.options.start_timeout_s)
        except BaseException:
            server.stop()
            self.live.remove(server)
            raise
        found = startup.as_dict()
        # How much else ran meanwhile: a start-up on a busy shared machine is slow for that.
        found["host_load"] = host.end(self.ours())
        self.log(f"[bench]   {spec.label} {spec.kind}: first completion after "
                 f"{startup.first_completion_s:.1f} s (other work: "
                 f"{100 * (found['host_load']['other_busy_fraction'] or 0):.0f}% of the CPUs)")
        return server, found

    def ours(self) -> float:
        """CPU seconds of this benchmark: this process, its finished children, live servers."""
        return own_cpu_seconds() + sum(s.cpu_seconds() for s in self.live)

    def stop_all(self) -> None:
        while self.live:
            self.live.pop().stop()

    def spec(self, kind: str, model: str, label: str) -> ServerSpec:
        return ServerSpec(kind, self.models[model], self.options.engine_args, label,
                          self.options.omp_threads_bind)

    # --- sections -----------------------------------------------------------------------

    def write_checkpoints(self) -> dict[str, str]:
        for ckpt in self.options.checkpoints():
            out = self.workdir / "models" / ckpt.name
            if not (out / "config.json").is_file():
                subprocess.run([sys.executable, "-m", "gemmguard.cli", "demo-model",
                                *ckpt.cli_args(out)], check=True, capture_output=True)
            self.models[ckpt.name] = out
        return {name: str(path) for name, path in self.models.items()}

    def kernels(self) -> dict[str, Any]:
        opts = self.options
        shapes = "demo" if opts.skip_large else "demo,4096"
        cmd = [sys.executable, "-m", "benchmarks.kernels", "--shapes", shapes,
               "--tokens", ",".join(map(str, opts.kernel_tokens)),
               "--repeats", str(opts.kernel_repeats)]
        # One thread: on a shared 2-core box, two OpenMP threads stall each other whenever
        # another process holds a core, and that swamps a per-call time of microseconds.
        env = {**os.environ, "OMP_NUM_THREADS": str(opts.kernel_threads),
               "VLLM_CPU_KVCACHE_SPACE": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"python -m benchmarks.kernels exited with {done.returncode}:\n"
                               + done.stderr[-3000:])
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        result["command"] = "python " + " ".join(cmd[1:])
        return result

    def request_path(self) -> dict[str, Any]:
        opts = self.options
        servers: dict[str, Server] = {}
        info: dict[str, Any] = {"model": "demo-bf16", "servers": {}}
        batches: list[dict[str, Any]] = []
        try:
            for kind in ("plain", "gemmguard"):
                server, startup = self.start(self.spec(kind, "demo-bf16", "request-path"))
                servers[kind] = server
                info["servers"][kind] = {"startup": startup,
                                         "gemmguard_visible": server.gemmguard_visible()}
            if info["servers"]["plain"]["gemmguard_visible"]:
                raise RuntimeError("the plain server answers gemmguard's routes or metrics: "
                                   "the comparison would not be against plain vLLM")
            top = max(opts.concurrency)
            for kind, server in servers.items():  # warm-up: not measured, still counted
                for stream in (False, True):
                    warm = load.batch(server.base_url, SERVED_NAME, server=kind,
                                      requests=2 * top, concurrency=top, stream=stream,
                                      max_tokens=opts.max_tokens, prompt_len=opts.prompt_len)
                    batches.append({**warm.as_dict(), "round": -1, "warmup": True})

            host = HostLoad.begin(self.ours())
            cell = 0
            next_prompt = 2 * top  # the warm-up's prompts are 0 … 2·top−1
            for rnd in range(opts.rounds):
                for concurrency in opts.concurrency:
                    for stream in (False, True):
                        kinds = ("plain", "gemmguard") if (rnd + cell) % 2 == 0 \
                            else ("gemmguard", "plain")
                        cell += 1
                        parts: dict[str, list[load.BatchResult]] = {k: [] for k in kinds}
                        for i, size in enumerate(chunks(opts.requests, concurrency)):
                            # A B B A …: both servers share each stretch of the machine's time.
                            for kind in kinds if i % 2 == 0 else kinds[::-1]:
                                parts[kind].append(load.batch(
                                    servers[kind].base_url, SERVED_NAME, server=kind,
                                    requests=size, concurrency=concurrency, stream=stream,
                                    max_tokens=opts.max_tokens, prompt_len=opts.prompt_len,
                                    first_prompt=next_prompt))
                            next_prompt += size
                        for position, kind in enumerate(kinds):
                            merged = load.BatchResult.merge(parts[kind])
                            batches.append({**merged.as_dict(), "round": rnd,
                                            "position": position, "chunks": len(parts[kind])})
                self.log(f"[bench]   request path: round {rnd + 1}/{opts.rounds} done")
            info["host_load"] = host.end(self.ours())
            info["memory"] = {kind: s.memory() for kind, s in servers.items()}
            info["batches"] = batches
            return info
        finally:
            for server in servers.values():
                server.stop()
                self.live.remove(server)

    def startup(self, pair_starts: dict[str, Any] | None) -> dict[str, Any]:
        opts = self.options
        samples: list[dict[str, Any]] = []
        for kind, found in (pair_starts or {}).items():
            samples.append({"model": "demo-bf16", "server": kind, "round": "request-path",
                            "startup": found["startup"], "memory": found["memory"]})
        side_by_side = [m for m in ("demo-bf16", "large-bf16") if m in self.models]
        alone = [m for m in ("demo-fp8-block", "large-fp8-block") if m in self.models]
        for rnd in range(opts.startup_rounds):
            order = ("gemmguard", "plain") if rnd % 2 == 0 else ("plain", "gemmguard")
            runs = [(m, k) for m in side_by_side for k in order] + [(m, "gemmguard")
                                                                     for m in alone]
            for model, kind in runs:
                try:
                    server, startup = self.start(self.spec(kind, model, f"startup-{model}"))
                except StartupError as exc:  # one start failing must not lose the others
                    self.problems.append(problem(f"start-up {model} {kind}", exc))
                    self.log(f"[bench]   {model} {kind} did not start: {exc.reason}")
                    continue
                memory = server.memory()
                server.stop()
                self.live.remove(server)
                sample = {"model": model, "server": kind, "round": rnd, "startup": startup,
                          "memory": memory}
                if model in alone:
                    sample["plain_missing_reason"] = NO_AMX_REASON
                samples.append(sample)
        return {"samples": samples}


def problem(section: str, exc: BaseException) -> dict[str, Any]:
    """A failed section or start-up as the report lists it: root causes first, then detail."""
    detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    found: dict[str, Any] = {"section": section, "error": detail[-4000:]}
    if isinstance(exc, StartupError):
        found.update(causes=exc.causes, log=exc.log_path)
    return found


# At most this many A/B chunks per batch, each at least two waves of `concurrency` requests.
MAX_CHUNKS = 8


def chunks(requests: int, concurrency: int) -> list[int]:
    """Sizes of the chunks a batch is split into, alternating between the two servers."""
    count = max(1, min(MAX_CHUNKS, requests // (2 * concurrency)))
    base, extra = divmod(requests, count)
    return [base + (1 if i < extra else 0) for i in range(count)]


def run(options: Options, workdir: Path, log: Log = print) -> dict[str, Any]:
    """Run every section and return the results (problems included); servers always stopped."""
    bench = Run(options, workdir, log)
    results: dict[str, Any] = {}
    try:
        results["checkpoints"] = bench.section("checkpoints", bench.write_checkpoints)
        if results["checkpoints"] is None:
            results["problems"] = bench.problems
            return compare.derive(results)
        if options.skip_kernels:
            results["kernels"] = {"skipped": "--skip-kernels"}
        else:
            results["kernels"] = bench.section("kernels (issue 4)", bench.kernels)
        path = bench.section("request path", bench.request_path)
        results["request_path"] = path
        pair = None
        if path:
            pair = {kind: {"startup": s["startup"], "memory": path["memory"][kind]}
                    for kind, s in path["servers"].items()}
        results["startup"] = bench.section("start-up", bench.startup, pair)
    finally:
        bench.stop_all()
    results["problems"] = bench.problems
    return compare.derive(results)
