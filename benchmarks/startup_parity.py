"""Start-up of `gemmguard serve` against `vllm serve`, in rotating order, with the A/A beside.

    python -m benchmarks.startup_parity --out docs/bench-cpu/startup-parity.json --rounds 5
    python -m benchmarks.startup_parity --out $OUT/startup.json --model CKPT --rounds 2 \
        --engine-args "--max-model-len 2048" --cache-root ~/.cache/vllm-startup   # the GPU

One checkpoint (by default the bf16 demo, which plain vLLM loads too), three arms started one at
a time: plain-a, gemmguard and plain-b, the order rotated every round so that no arm always
starts first or after the same one. Each start is timed from launch to vLLM's first log line
(what runs before vLLM: for gemmguard its supervisor and planning), to /health 200, and for
gemmguard to /gemmguard/ready 200; then it is stopped. Per round, gemmguard / mean(plain-a,
plain-b) is printed beside plain-a / plain-b: a ratio is only as good as that A/A spread.
Round 0 is not counted: it warms the page cache, or with --cache-root it is the cold start of
each arm (its torch.compile cache emptied first; plain-a and plain-b share one, as the same
graphs), which is recorded beside the warm rounds. `--warm` skips round 0 where an earlier call
left the caches warm (a GPU call of 10 minutes holds the cold starts or the warm rounds, not both).
The results file is written after every start, so a run cut short keeps what it measured; each
gemmguard start also keeps its self-check's summary line (the check's own seconds by phase).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.cli import CPU_KVCACHE_GIB, ENGINE_ARGS, _free_port
from benchmarks.comparison import Spread
from benchmarks.servers import start
from gemmguard.demo.store import ensure_demo_model

ARMS = ("plain-a", "gemmguard", "plain-b")
# vLLM's log format (all of 0.26-0.33): "LEVEL MM-DD HH:MM:SS [file.py:line] message", after
# a "(APIServer pid=N) " prefix in later processes.
VLLM_LOG_LINE = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d\S* \[")
TIMES = ("first_line_s", "health_s")
SELFCHECK_LINE = re.compile(r"gemmguard self-check \(rank \d+\): .*")


class FirstLine(threading.Thread):
    """Watches a log file from launch and notes when vLLM's first log line appears in it."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.line = path, ""
        self.seen_at: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                text = self.path.read_text(errors="replace")
            except OSError:
                text = ""
            for line in text.splitlines():
                if VLLM_LOG_LINE.search(line):
                    self.seen_at = time.monotonic()
                    self.line = line.strip()
                    return
            time.sleep(0.02)


def one_start(arm: str, model: Path, engine_args: list[str], env: dict[str, str],
              log_dir: Path) -> dict[str, Any]:
    """Launch one arm, time it to vLLM's first line, /health (and ready), then stop it."""
    log_dir.mkdir(parents=True)
    name = "gemmguard" if arm == "gemmguard" else "plain"
    watcher = FirstLine(log_dir / f"{name}.log")
    watcher.start()
    try:
        server = start(name, model, _free_port(), engine_args, env, log_dir)
    finally:
        watcher.stop.set()
    server.stop()
    watcher.join()
    if watcher.seen_at is None:
        raise RuntimeError(f"No vLLM log line in {watcher.path}: cannot time the start.")
    record = {"arm": arm, "first_line_s": round(watcher.seen_at - server.launched, 3),
              "health_s": round(server.health_s or 0.0, 3),
              "ready_s": None if server.ready_s is None else round(server.ready_s, 3),
              "first_line": watcher.line[:160]}
    if arm == "gemmguard":
        found = SELFCHECK_LINE.findall(watcher.path.read_text(errors="replace"))
        record["selfcheck"] = found[0] if found else None
    return record


def ratios(starts: list[dict[str, Any]], field: str) -> dict[str, Spread | None]:
    """Per round: gemmguard / mean(plain-a, plain-b), and the A/A plain-a / plain-b."""
    ab, aa = [], []
    for number in sorted({s["round"] for s in starts if s["round"] > 0}):
        arms = {s["arm"]: float(s[field]) for s in starts if s["round"] == number}
        if len(arms) < len(ARMS):  # a round cut short by the call's end
            continue
        ab.append(arms["gemmguard"] / statistics.mean([arms["plain-a"], arms["plain-b"]]))
        aa.append(arms["plain-a"] / arms["plain-b"])
    return {"gemmguard/plain": Spread.of(ab), "plain-a/plain-b": Spread.of(aa)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.startup_parity", description=(
        "Start plain-a, gemmguard and plain-b one at a time in rotating order and compare "
        "their start-up (launch → vLLM's first log line, → /health), with the A/A beside."))
    p.add_argument("--out", type=Path, required=True, help="JSON file for the results.")
    p.add_argument("--rounds", type=int, default=5,
                   help="Counted rounds of three starts (after round 0). Default: 5.")
    p.add_argument("--model", type=Path, default=None,
                   help="Checkpoint folder. Default: the bf16 demo, made in a temporary folder.")
    p.add_argument("--engine-args", default=shlex.join(ENGINE_ARGS),
                   help="vLLM options of every arm, one string. "
                   f"Default: '{shlex.join(ENGINE_ARGS)}'.")
    p.add_argument("--env", action="append", default=[], metavar="ARM:NAME=VALUE",
                   help="An environment setting of one arm, gemmguard or plain (repeatable), e.g. "
                   "gemmguard:VLLM_USE_DEEP_GEMM=1. Default: none.")
    p.add_argument("--cache-root", type=Path, default=None,
                   help="Give each arm VLLM_CACHE_ROOT=DIR/ARM and make round 0 the cold "
                   "start of each (DIR/ARM emptied first). Default: vLLM's own cache, round 0 "
                   "warms the page cache.")
    p.add_argument("--warm", action="store_true",
                   help="No round 0 (the caches are warm from an earlier run); every round counts.")
    return p


def arm_env(base: dict[str, str], arm: str, settings: list[str], cache_root: Path | None
            ) -> dict[str, str]:
    """The environment one arm starts with: `base`, its --env settings, its cache root."""
    name = "gemmguard" if arm == "gemmguard" else "plain"
    env = dict(base)
    for setting in settings:
        target, _, assignment = setting.partition(":")
        key, equals, value = assignment.partition("=")
        if target not in ("gemmguard", "plain") or not key or not equals:
            raise SystemExit(f"--env '{setting}' is not ARM:NAME=VALUE with ARM gemmguard or "
                             "plain (e.g. gemmguard:VLLM_USE_DEEP_GEMM=1).")
        if target == name:
            env[key] = value
    if cache_root is not None:
        env["VLLM_CACHE_ROOT"] = str(cache_root / name)
    return env


def results(args: argparse.Namespace, argv: list[str] | None, engine_args: list[str],
            starts: list[dict[str, Any]]) -> dict[str, Any]:
    spreads = {field: ratios(starts, field) for field in TIMES}
    return {"command": "python -m benchmarks.startup_parity "
                       + " ".join(sys.argv[1:] if argv is None else argv),
            "engine_args": engine_args, "env": args.env, "rounds": args.rounds,
            "ratios": {field: {k: None if v is None else vars(v) for k, v in by_arm.items()}
                       for field, by_arm in spreads.items()},
            "starts": starts}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE",
                                                                  CPU_KVCACHE_GIB)}
    engine_args = shlex.split(args.engine_args)
    starts: list[dict[str, Any]] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cold = args.cache_root is not None and not args.warm
    with tempfile.TemporaryDirectory(prefix="gemmguard-startup-parity-") as tmp:
        model = args.model or ensure_demo_model(Path(tmp) / "bf16", "bf16")
        if cold:  # round 0 is each arm's cold start
            for name in ("plain", "gemmguard"):
                shutil.rmtree(args.cache_root / name, ignore_errors=True)
        for number in range(1 if args.warm else 0, args.rounds + 1):
            order = ARMS[number % 3:] + ARMS[:number % 3]
            for arm in order:
                record = {"round": number, "cold": number == 0 and cold and arm != "plain-b",
                          **one_start(arm, model, engine_args,
                                      arm_env(env, arm, args.env, args.cache_root),
                                      Path(tmp) / f"r{number}-{arm}")}
                starts.append(record)
                print(f"[startup-parity] {json.dumps(record)}", file=sys.stderr, flush=True)
                args.out.write_text(json.dumps(results(args, argv, engine_args, starts),
                                               indent=1) + "\n")
    for field, by_arm in results(args, argv, engine_args, starts)["ratios"].items():
        print(f"launch → {field[:-2].replace('_', ' ')}: gemmguard/plain "
              + "; A/A plain-a/plain-b ".join(
                  "–" if s is None else Spread(**s).text() for s in by_arm.values())
              + f"  (median, range over {args.rounds} rounds)")
    return 0

if __name__ == "__main__":
    sys.exit(main())
