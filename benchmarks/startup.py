"""Start-up of `gemmguard serve` on the fp8-block demo, and the self-check's share of it.

    python -m benchmarks.startup --out docs/bench-cpu/startup.json
    python -m benchmarks.startup --out /tmp/s.json --test-kernels garbage   # with replacements

`python -m benchmarks` measures the bf16 demo (the one plain vLLM loads too) in eager mode; this
is the demo gemmguard serves by default, FP8 block-scaled, in vLLM's default compiled mode. Each
start is timed launch → `/health` → `/gemmguard/ready`; the self-check's time is the report's
`duration_seconds` (the slowest rank's sampling, measuring and replacing, not vLLM's own
post-processing). Starts run one after another, never beside each other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.cli import CPU_KVCACHE_GIB, _free_port
from benchmarks.servers import start
from gemmguard.demo.store import ensure_demo_model

ENGINE_ARGS = ["--max-model-len", "1024", "--max-num-seqs", "8"]


def one_start(model: Path, eager: bool, env: dict[str, str], log_dir: Path) -> dict[str, Any]:
    """Start, read the report, stop: the start-up split and the check's share of it."""
    args = [*ENGINE_ARGS, *(["--enforce-eager"] if eager else [])]
    server = start("gemmguard", model, _free_port(), args, env, log_dir)
    try:
        report = server.get("/gemmguard/v1/selfcheck").json()
    finally:
        server.stop()
    assert server.ready_s is not None
    check_s = float(report["duration_seconds"])
    return {"health_s": round(server.health_s or 0.0, 2), "ready_s": round(server.ready_s, 2),
            "selfcheck_s": check_s, "share_of_ready": check_s / server.ready_s,
            "counts": report["counts"], "replaced": len(report["replacements"])}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=(
        "Start gemmguard serve on the fp8-block demo a few times and report the self-check's "
        "share of each start-up."))
    p.add_argument("--out", type=Path, required=True, help="JSON file for the results.")
    p.add_argument("--starts", type=int, default=3, help="Starts, one after another. Default: 3.")
    p.add_argument("--eager", action="store_true",
                   help="Pass --enforce-eager (no torch.compile). Default: compiled mode.")
    p.add_argument("--test-kernels", default="",
                   help="GEMMGUARD_TEST_KERNELS for the server (e.g. garbage: every FP8 layer is "
                   "replaced in place). Default: none.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE",
                                                                  CPU_KVCACHE_GIB)}
    if args.test_kernels:
        env["GEMMGUARD_TEST_KERNELS"] = args.test_kernels
    with tempfile.TemporaryDirectory(prefix="gemmguard-startup-") as tmp:
        model = ensure_demo_model(Path(tmp) / "fp8-block", "fp8-block")
        starts = []
        for number in range(1, args.starts + 1):
            starts.append(one_start(model, args.eager, env, Path(tmp)))
            print(f"[startup] start {number}: {json.dumps(starts[-1])}", file=sys.stderr,
                  flush=True)
    result = {"command": "python -m benchmarks.startup " + " ".join(argv or sys.argv[1:]),
              "eager": args.eager, "test_kernels": args.test_kernels, "starts": starts,
              "median_ready_s": statistics.median(s["ready_s"] for s in starts),
              "median_selfcheck_s": statistics.median(s["selfcheck_s"] for s in starts),
              "max_share_of_ready": max(s["share_of_ready"] for s in starts)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"Self-check: median {result['median_selfcheck_s']:.3f} s of a median "
          f"{result['median_ready_s']:.1f} s launch → ready; at most "
          f"{100 * result['max_share_of_ready']:.2f}% of a start ({len(starts)} starts).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
