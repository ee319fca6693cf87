"""Rounds of `vllm bench serve`, arms in alternating order, in one process, tagged by arm.

Round r runs every arm once on the same prompts (random dataset, seed r), the given order rotated
by r (`order`): with three arms plain, gemmguard, plain-b every arm goes first, second and third
in turn; with two it alternates (ABBA). Number the rounds so that no server gets the same round
twice: then no server sees a prompt twice. vLLM is imported
once and `vllm bench serve` runs in this process: a fresh `vllm` process spends 5-40 s importing
before each run. Used by `make bench` (benchmarks.cli) and by scripts/gpu-bench.sh:

    python -m benchmarks.rounds --results DIR --tokenizer CKPT --served-model-name M \\
        --rounds 1,2 --arm plain=http://127.0.0.1:8100 \\
        --arm gemmguard=http://127.0.0.1:8101 --load decode:128:512:128:384
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from benchmarks import vllm_cli


@dataclass(frozen=True)
class Load:
    """One `vllm bench serve` load: random prompts of fixed lengths at bounded concurrency."""

    name: str
    input_len: int
    output_len: int
    concurrency: int
    prompts: int

    @classmethod
    def parse(cls, text: str) -> Load:
        """NAME:INPUT:OUTPUT:CONCURRENCY:PROMPTS, e.g. decode:128:512:128:384."""
        parts = text.split(":")
        try:
            numbers = [int(p) for p in parts[1:]]
        except ValueError:
            numbers = []
        if len(numbers) != 4 or min(numbers) < 1 or not parts[0]:
            raise argparse.ArgumentTypeError(
                f"Load '{text}' is not NAME:INPUT:OUTPUT:CONCURRENCY:PROMPTS with positive "
                "numbers (e.g. decode:128:512:128:384).")
        return cls(parts[0], *numbers)


def bench_argv(url: str, served_name: str, tokenizer: str, load: Load, arm: str, round_: int,
               results: Path, extra: Sequence[str] = ()) -> list[str]:
    """`vllm bench serve` arguments for one run; vLLM saves RESULTS/LOAD-rROUND-ARM.json."""
    return [
        "bench", "serve", "--backend", "vllm", "--base-url", url,
        "--model", served_name, "--tokenizer", tokenizer,
        "--dataset-name", "random", "--random-input-len", str(load.input_len),
        "--random-output-len", str(load.output_len), "--ignore-eos", "--seed", str(round_),
        "--num-prompts", str(load.prompts), "--max-concurrency", str(load.concurrency),
        "--disable-tqdm", "--save-result", "--result-dir", str(results),
        "--result-filename", f"{load.name}-r{round_}-{arm}.json",
        *extra,
        # Read back by benchmarks.comparison; vLLM stores them as top-level keys.
        "--metadata", f"ab_arm={arm}", f"ab_load={load.name}", f"ab_round={round_}",
    ]


_PRINTOUTS: dict[Path, TextIO] = {}


def _printout(results: Path) -> TextIO:
    """RESULTS/vllm-bench.log, open for the rest of the process.

    vLLM's log handler keeps the sys.stdout it found when it configured logging, which can
    happen during a run, while stdout is redirected here: a file closed after that run would
    make every later log line an error.
    """
    path = results / "vllm-bench.log"
    if path not in _PRINTOUTS:
        _PRINTOUTS[path] = path.open("a")
    return _PRINTOUTS[path]


def order(names: Sequence[str], round_: int) -> list[str]:
    """The arms of round `round_`, rotated so that round 1 runs the given order."""
    shift = (round_ - 1) % len(names)
    return [*names[shift:], *names[:shift]]


def run_rounds(arms: dict[str, str], loads: Sequence[Load], rounds: Sequence[int],
               served_name: str, tokenizer: str, results: Path, extra: Sequence[str] = (),
               before: Callable[[str], None] | None = None,
               after: Callable[[str], None] | None = None,
               deadline: float | None = None, log: Callable[[str], None] = print) -> int:
    """Every load × round × arm; returns the runs done. Stops early (logged) at `deadline`."""
    results.mkdir(parents=True, exist_ok=True)
    sink = _printout(results)
    names = list(arms)
    done = 0
    longest = 0.0
    for load in loads:
        for round_ in rounds:
            for arm in order(names, round_):
                if deadline is not None and time.time() + longest > deadline:
                    log(f"[rounds] deadline: {load.name} round {round_} {arm} not run")
                    return done
                if before is not None:
                    before(arm)
                started = time.time()
                log(f"[rounds] {load.name} round {round_}: {arm}")
                argv = bench_argv(arms[arm], served_name, tokenizer, load, arm, round_, results,
                                  extra)
                print(f"=== {load.name} round {round_}: {arm}", file=sink, flush=True)
                with contextlib.redirect_stdout(sink):
                    vllm_cli.main(argv)
                sink.flush()
                longest = max(longest, time.time() - started)
                done += 1
                if after is not None:
                    after(arm)
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rounds", description=(
        "Run rounds of `vllm bench serve` against named servers, in rotating order, tagged for "
        "benchmarks.comparison."))
    p.add_argument("--results", type=Path, required=True, help="Folder for vLLM's result JSONs.")
    p.add_argument("--tokenizer", required=True, help="Tokenizer folder (the checkpoint).")
    p.add_argument("--served-model-name", required=True, help="Model name the servers serve.")
    p.add_argument("--arm", action="append", required=True, metavar="NAME=URL",
                   help="A server, in odd rounds' order (repeat): plain, gemmguard, plain-b.")
    p.add_argument("--load", type=Load.parse, action="append", required=True,
                   metavar="NAME:IN:OUT:CONCURRENCY:PROMPTS", help="A load (repeatable).")
    p.add_argument("--rounds", default="1,2,3", help="Round numbers, comma-separated. "
                   "Default: 1,2,3.")
    p.add_argument("--deadline", type=float, default=None, metavar="EPOCH_S",
                   help="Start no run that would end after this time (seconds since the "
                   "epoch), judged by the longest run so far. Default: none.")
    p.add_argument("--extra", default="", help="More `vllm bench serve` options, one string. "
                   "Default: none.")
    args = p.parse_args(argv)
    arms = dict(a.split("=", 1) for a in args.arm)
    rounds = [int(r) for r in args.rounds.split(",")]

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    run_rounds(arms, args.load, rounds, args.served_model_name, args.tokenizer,
               args.results, args.extra.split(), deadline=args.deadline, log=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
