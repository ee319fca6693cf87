"""`make bench`: gemmguard against plain vLLM on this machine, measured with `vllm bench serve`.

    python -m benchmarks --out docs/bench-cpu              # what `make bench` runs
    python -m benchmarks --out /tmp/b --rounds 1 --skip-kernels   # a quick look

One checkpoint (the bf16 demo model, which plain vLLM loads too), three servers up together:
plain vLLM, gemmguard and a second plain server (`plain-b`, for the A/A ratio). Only the one being
measured runs; the others are frozen. `vllm bench serve` runs against each in rotating order
(every arm goes first, second and third in turn), the method scripts/gpu-bench.sh uses on one
GPU. Each round uses its own random-prompt seed, so no server sees a prompt twice.
Beside vLLM's result JSONs it records what only gemmguard has: the start-up split (launch →
/health → /gemmguard/ready), the self-check's share of it, memory, canaries sent under load and
their latency, and the portable FP8 kernels' speed (`benchmarks.kernels`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from benchmarks import comparison, rounds
from benchmarks.servers import SERVED_NAME, Server, start

# Same vLLM options for every server: a short context keeps the CPU engine's start quick.
ENGINE_ARGS = ["--enforce-eager", "--max-model-len", "1024"]
# The CPU engine's KV cache for every server (gemmguard serve's default too), in GiB.
CPU_KVCACHE_GIB = "1"
# Small enough for a 2-core box: a run takes a few seconds.
DEFAULT_LOAD = "small:64:64:4:32"
SETTLE_S = 2.0  # after a thaw, before measuring: a canary that fell due while frozen runs here


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _canaries(server: Server) -> tuple[int, float, float]:
    """Canaries sent so far, and the canary latency histogram's count and sum."""
    sent = int(server.get("/gemmguard/live").json()["canaries_sent"])
    count = total = 0.0
    for family in text_string_to_metric_families(server.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "gemmguard_canary_latency_seconds_count":
                count += sample.value
            elif sample.name == "gemmguard_canary_latency_seconds_sum":
                total += sample.value
    return sent, count, total


def run_arms(numbers: range, servers: dict[str, Server], model: Path, args: argparse.Namespace,
             results: Path, log: Callable[[str], None]) -> int:
    """Rounds in rotating order, each server thawed only for its own runs; returns the canaries
    gemmguard sent while it was measured."""
    canaries = [0]

    def before(arm: str) -> None:
        servers[arm].freeze(False)
        time.sleep(SETTLE_S)
        if arm == "gemmguard":
            canaries[0] -= _canaries(servers[arm])[0]

    def after(arm: str) -> None:
        if arm == "gemmguard":
            canaries[0] += _canaries(servers[arm])[0]
        servers[arm].freeze(True)

    rounds.run_rounds({arm: s.url for arm, s in servers.items()}, args.load, numbers,
                      SERVED_NAME, str(model), results,
                      extra=["--num-warmups", str(max(load.concurrency for load in args.load))],
                      before=before, after=after, log=log)
    return canaries[0]


def run(args: argparse.Namespace, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    results = args.out / "results"
    results.mkdir(parents=True, exist_ok=True)
    for old in [*results.glob("*.json"), *results.glob("*.log"), results / comparison.STARTUP_FILE]:
        old.unlink(missing_ok=True)  # one run per folder: the summary pairs what it finds
    model = work / "model"
    subprocess.run([sys.executable, "-m", "gemmguard.cli", "demo-model", "--scheme", "bf16",
                    "--out", str(model)], check=True, stdout=subprocess.DEVNULL)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE",
                                                                  CPU_KVCACHE_GIB)}
    own: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}}
    servers: dict[str, Server] = {}
    startups = results / comparison.STARTUP_FILE

    def launch(arm: str) -> Server:
        log(f"[bench] starting {arm}")
        server = start(arm, model, _free_port(), ENGINE_ARGS, env, work)
        with startups.open("a") as out:
            out.write(json.dumps({"arm": arm, "start": 1, "health_s": server.health_s,
                                  "ready_s": server.ready_s}) + "\n")
        server.freeze(True)  # starts one at a time, and nobody runs while another is measured
        servers[arm] = server
        return server

    try:
        launch("plain")
        gemmguard = launch("gemmguard")
        gemmguard.freeze(False)
        selfcheck = gemmguard.get("/gemmguard/v1/selfcheck").json()
        gemmguard.freeze(True)
        own["selfcheck"] = {
            "duration_s": selfcheck.get("duration_seconds"),
            "share_of_ready": (selfcheck.get("duration_seconds") or 0) / gemmguard.ready_s,
            "sample_fraction": selfcheck.get("sample_fraction")}
        launch("plain-b")
        own["canaries_sent_while_measured"] = run_arms(
            range(1, args.rounds + 1), dict(servers), model, args, results, log)
        gemmguard.freeze(False)
        _, count, total = _canaries(gemmguard)
        own["canary_latency_mean_s"] = total / count if count else None
        own["memory_mib"] = {arm: s.memory_mib() for arm, s in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    if not args.skip_kernels:
        log("[bench] portable FP8 kernels")
        timed = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--shapes", "demo",
                                "--tokens", "1,16,128", "--repeats", "3"],
                               check=True, capture_output=True, text=True)
        own["kernels"] = json.loads(timed.stdout)
    return own


def own_lines(own: dict[str, Any]) -> list[str]:
    """What only gemmguard has: self-check share, canaries, memory, portable kernels."""
    sc = own["selfcheck"]
    lines = [f"Self-check: {sc['duration_s']:.2f} s, {100 * sc['share_of_ready']:.1f}% of "
             "gemmguard's launch → ready time.",
             f"Canaries sent while gemmguard was measured: {own['canaries_sent_while_measured']}"
             + (f"; a canary took {1000 * own['canary_latency_mean_s']:.0f} ms on average."
                if own.get("canary_latency_mean_s") else "."),
             "", "| server | RSS | USS | PSS |", "|---|---|---|---|"]
    for arm, mem in own["memory_mib"].items():
        lines.append(f"| {arm} | {mem['rss']:,.0f} MiB | {mem['uss']:,.0f} MiB | "
                     f"{mem['pss']:,.0f} MiB |")
    if "kernels" in own:
        lines += ["", "| layer | tokens | F.linear bf16 | Dequant (W8A16) | Emulated (W8A8) |",
                  "|---|---|---|---|---|"]
        for row in own["kernels"]["rows"]:
            r = row["ratio_vs_bf16"]
            lines.append(f"| {row['shape']} | {row['tokens']} | "
                         f"{1e6 * row['seconds']['bf16_linear']:.0f} µs | "
                         f"{r['PortableFp8BlockDequantKernel']:.2f}× | "
                         f"{r['PortableFp8BlockEmulatedKernel']:.2f}× |")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=(
        "gemmguard serve against plain vLLM with `vllm bench serve` (A/B, and A/A for noise), "
        "plus gemmguard's own start-up split, memory, canary and portable kernel figures."))
    p.add_argument("--out", type=Path, default=Path("benchmark-results"),
                   help="Folder for results/ (vLLM's JSONs and startup.jsonl), gemmguard.json "
                   "and summary.md. Default: benchmark-results.")
    p.add_argument("--rounds", type=int, default=3,
                   help="Rounds per load (each arm once per round). Default: 3.")
    p.add_argument("--load", type=rounds.Load.parse, action="append", default=None,
                   metavar="NAME:IN:OUT:CONCURRENCY:PROMPTS",
                   help=f"A load for `vllm bench serve` (repeatable). Default: {DEFAULT_LOAD}.")
    p.add_argument("--skip-kernels", action="store_true",
                   help="Leave out the portable FP8 kernel timing. Default: include it.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.load = args.load or [rounds.Load.parse(DEFAULT_LOAD)]

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="gemmguard-bench-") as tmp:
        try:
            own = run(args, Path(tmp), log)
        except (Exception, SystemExit) as exc:  # a server or a vLLM run failed: show its log
            log(f"[bench] failed: {exc!r}")
            for path in [*sorted(Path(tmp).glob("*.log")),
                         *sorted((args.out / "results").glob("*.log"))]:
                log(f"--- {path.name} (last lines)\n" + path.read_text(errors="replace")[-3000:])
            return 1
    for log_file in (args.out / "results").glob("*.log"):  # vLLM's printout, also in the JSONs
        log_file.unlink()
    (args.out / "gemmguard.json").write_text(json.dumps(own, indent=1) + "\n")
    summary = "\n".join([comparison.markdown(args.out / "results"), "", *own_lines(own)])
    (args.out / "summary.md").write_text(summary + "\n")
    print(summary)
    return 0
