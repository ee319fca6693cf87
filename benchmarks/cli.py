"""`python -m benchmarks`: gemmguard against plain vLLM on this machine; writes the report.

    python -m benchmarks --out docs                     # the committed report (make bench)
    python -m benchmarks --out /tmp/b --requests 8 --concurrency 1,2 --rounds 1 \\
        --skip-large --skip-fp8                         # a smoke run, a few minutes
    python -m benchmarks --render docs/benchmarks.json --out docs  # re-derive, re-render

Exit status: 0 when every section ran and every request was answered; 1 otherwise (the
report is written either way). The speed goals are reported, never enforced.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import compare, report
from benchmarks.machine import default_omp_bind, machine, versions
from benchmarks.runner import Options, run


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a comma-separated list of integers (e.g. 1,4,16).") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' must list positive integers (e.g. 1,4,16).")
    return values


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer.") from exc
    if value < 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be 0 or more.")
    return value


def _positive(text: str) -> int:
    value = _ints(text)
    if len(value) != 1:
        raise argparse.ArgumentTypeError(f"'{text}' must be one positive integer.")
    return value[0]


def build_parser() -> argparse.ArgumentParser:
    d = Options()
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure gemmguard serve against vLLM's own OpenAI server on this machine "
        "(request path, start-up, memory, load held) and the portable FP8 kernels; write "
        "benchmarks.md and benchmarks.json.")
    p.add_argument("--out", type=Path, default=Path("benchmark-results"),
                   help="Folder for benchmarks.md and benchmarks.json. Default: "
                   "benchmark-results.")
    p.add_argument("--requests", type=_positive, default=d.requests,
                   help=f"Requests per batch (one server, one concurrency, one round). "
                   f"Default: {d.requests}.")
    p.add_argument("--concurrency", type=_ints, default=d.concurrency,
                   help="Concurrency levels, comma-separated. Default: "
                   f"{','.join(map(str, d.concurrency))}.")
    p.add_argument("--rounds", type=_positive, default=d.rounds,
                   help=f"A/B rounds of the request path. Default: {d.rounds}.")
    p.add_argument("--max-tokens", type=_positive, default=d.max_tokens,
                   help=f"Output tokens per request (end token ignored). Default: {d.max_tokens}.")
    p.add_argument("--prompt-len", type=_positive, default=d.prompt_len,
                   help=f"Prompt length in characters (one demo token each). "
                   f"Default: {d.prompt_len}.")
    p.add_argument("--startup-rounds", type=_count, default=d.startup_rounds,
                   help="Start-ups of each server alone per checkpoint, on top of the request "
                   f"path's pair. Default: {d.startup_rounds}.")
    p.add_argument("--engine-args", default=shlex.join(d.engine_args),
                   help="vLLM options both servers get, as one string. Default: "
                   f"'{shlex.join(d.engine_args)}'.")
    p.add_argument("--omp-threads-bind", default=None, metavar="CPUS",
                   help="VLLM_CPU_OMP_THREADS_BIND for both servers' engines (e.g. 0, 0-6, "
                   "auto). Default: every usable CPU but the last, which is left to the API "
                   f"servers and the load client (here: {default_omp_bind()}).")
    p.add_argument("--large", type=_ints, default=d.large, metavar="LAYERS,HIDDEN,INTERMEDIATE",
                   help="Shape of the larger synthetic checkpoint. Default: "
                   f"{','.join(map(str, d.large))}.")
    p.add_argument("--skip-large", action="store_true",
                   help="Leave out the larger checkpoint and the 4096×4096 kernel shape. "
                   "Default: include them.")
    p.add_argument("--skip-fp8", action="store_true",
                   help="Leave out the fp8-block start-ups (gemmguard alone). Default: include.")
    p.add_argument("--skip-kernels", action="store_true",
                   help="Leave out the portable kernel timing (issue 4). Default: include it.")
    p.add_argument("--kernel-tokens", type=_ints, default=d.kernel_tokens,
                   help="Token counts for the kernel timing. Default: "
                   f"{','.join(map(str, d.kernel_tokens))}.")
    p.add_argument("--kernel-threads", type=_positive, default=d.kernel_threads,
                   help=f"Torch threads for the kernel timing. Default: {d.kernel_threads}.")
    p.add_argument("--kernel-repeats", type=_positive, default=d.kernel_repeats,
                   help=f"Interleaved repeats per kernel timing. Default: {d.kernel_repeats}.")
    p.add_argument("--start-timeout", type=float, default=d.start_timeout_s,
                   help="Seconds a server may take to answer its first completion. "
                   f"Default: {d.start_timeout_s:.0f}.")
    p.add_argument("--workdir", type=Path, default=None,
                   help="Folder for checkpoints and server logs, kept afterwards. Default: a "
                   "temporary folder, removed unless a section failed.")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="Measure nothing: re-derive the summaries of this benchmarks.json "
                   "from its raw measurements and write both files into --out.")
    return p


def options_from(args: argparse.Namespace) -> Options:
    if len(args.large) != 3:
        raise SystemExit(f"--large has value {args.large}; it takes LAYERS,HIDDEN,INTERMEDIATE "
                         "(e.g. 8,1024,4096).")
    return Options(
        requests=args.requests, concurrency=args.concurrency, rounds=args.rounds,
        max_tokens=args.max_tokens, prompt_len=args.prompt_len,
        startup_rounds=args.startup_rounds, engine_args=tuple(shlex.split(args.engine_args)),
        omp_threads_bind=args.omp_threads_bind or default_omp_bind(),
        large=args.large, skip_large=args.skip_large, skip_fp8=args.skip_fp8,
        skip_kernels=args.skip_kernels, kernel_tokens=args.kernel_tokens,
        kernel_threads=args.kernel_threads, kernel_repeats=args.kernel_repeats,
        start_timeout_s=args.start_timeout)


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.render is not None:
        results = compare.derive(json.loads(args.render.read_text()))
        md, js = report.write(results, args.out)
        print(f"Wrote {md} and {js}")
        return 0
    options = options_from(args)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gemmguard-bench-"))
    started = datetime.datetime.now(datetime.timezone.utc)
    clock = time.perf_counter()
    results = {
        "command": "python -m benchmarks " + shlex.join(argv),
        "python_executable": sys.executable,
        "started": started.isoformat(timespec="seconds"),
        "versions": versions(),
        "machine": machine(),
        "settings": options.as_dict(),
    }
    _log(f"[bench] workdir {workdir}")
    results.update(run(options, workdir, _log))
    results["duration_s"] = time.perf_counter() - clock
    md, js = report.write(results, args.out)
    failed = bool(results["problems"]) or not (results.get("load_held") or {}).get("held")
    print("\n".join(["", "gemmguard benchmark summary", "-" * 27,
                     *report.summary_lines(results), "", f"Report: {md}", f"Data:   {js}"]))
    if args.workdir is None and not failed:
        shutil.rmtree(workdir, ignore_errors=True)
    elif failed:
        print(f"Server logs kept in {workdir / 'logs'}")
    return 1 if failed else 0

