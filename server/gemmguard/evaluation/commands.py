"""`gemmguard eval` and `gemmguard eval-kernels`: accuracy checks against running servers.

Exit status: 0 within tolerance, 1 outside it, 2 when the eval could not run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path
from typing import Any

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
EXIT_OUTSIDE_TOLERANCE = 1
# HARDWARE_TARGETS prefix -> the platform name gemmguard's build route reports.
_PLATFORM_OF_TARGET = {"cuda": "cuda", "rocm": "rocm", "cpu": "cpu"}


def _timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # default=str: lm-eval leaves a few non-JSON values (e.g. numpy scalars) in its records.
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def _describe_build(build: dict[str, Any] | None) -> str:
    if not build:
        return ""
    return (
        f"(gemmguard {build.get('version')}, vLLM {build.get('vllm_version')}, "
        f"{build.get('platform')}, {build.get('device')})"
    )


def platform_note(hardware: str, build: dict[str, Any] | None) -> str | None:
    """A warning when the server's reported platform is not the config's hardware target."""
    expected = _PLATFORM_OF_TARGET[hardware.split("-")[0]]
    reported = (build or {}).get("platform")
    if reported is None or reported == expected:
        return None
    return (
        f"the config is for {hardware}, but the server reports platform '{reported}'; "
        "the expected figures may not apply."
    )


def _eval(args: argparse.Namespace) -> int:
    from gemmguard.evaluation.client import ServerClient
    from gemmguard.evaluation.config import load_config
    from gemmguard.evaluation.harness import go_offline, run_harness
    from gemmguard.evaluation.tasks import default_tasks_dir
    from gemmguard.evaluation.verdict import judge, render, result_document

    # Before anything can import `datasets`, which reads these once.
    go_offline()
    config = load_config(args.config)
    client = ServerClient(args.base_url, timeout_s=args.timeout)
    model = client.pick_model(args.model, expected=None if args.model else config.model_name)
    build = client.build()
    note = platform_note(config.hardware, build)
    notes = [] if note is None else [note]
    limit = args.limit if args.limit is not None else config.limit
    tasks_dir = Path(args.tasks_dir) if args.tasks_dir else default_tasks_dir(config.path)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    clock = time.monotonic()
    run = run_harness(config, tasks_dir, client.base_url, model, limit, args.concurrency,
                      args.timeout)
    info = {
        "base_url": client.base_url,
        "model": model,
        "model_type": run.model_type,
        "model_args": run.model_args,
        "limit": limit,
        "started_at": started,
        "duration_s": round(time.monotonic() - clock, 1),
        "server": _describe_build(build),
        "server_build": build,
        "notes": notes,
    }
    verdict = judge(config, run.results.get("results", {}))
    document = result_document(config, verdict, run.results, info)
    output = Path(args.output or f"gemmguard-eval-{config.stem}-{_timestamp()}.json")
    _write_json(output, document)
    print(render(config, verdict, document))
    print(f"Result written to {output}")
    return 0 if verdict.passed else EXIT_OUTSIDE_TOLERANCE


def _eval_kernels(args: argparse.Namespace) -> int:
    from gemmguard.evaluation.client import ServerClient
    from gemmguard.evaluation.kernel_swap import DEFAULT_PROMPTS, load_prompts, run_kernel_swap

    candidate = ServerClient(args.base_url, timeout_s=args.timeout)
    reference = ServerClient(args.reference_url, timeout_s=args.timeout)
    candidate_model = candidate.pick_model(args.model)
    reference_model = reference.pick_model(args.reference_model or args.model)
    prompts = load_prompts(Path(args.prompts)) if args.prompts else DEFAULT_PROMPTS
    report = run_kernel_swap(
        candidate, reference, candidate_model, reference_model, prompts,
        args.max_tokens, args.top_logprobs, args.min_agreement, args.max_mean_kl,
    )
    output = Path(args.output or f"gemmguard-eval-kernels-{_timestamp()}.json")
    _write_json(output, report.document())
    print(report.render())
    print(f"Report written to {output}")
    return 0 if report.passed else EXIT_OUTSIDE_TOLERANCE


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, metavar="URL",
                        help=f"The server to evaluate (with or without /v1). "
                        f"Default: {DEFAULT_BASE_URL}.")
    parser.add_argument("--output", metavar="FILE",
                        help="Where to write the JSON result. Default: a timestamped file "
                        "in the current directory.")
    parser.add_argument("--timeout", type=_positive_int, default=600, metavar="S",
                        help="Seconds to wait for one request. Default: 600.")


def add_eval_commands(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the evaluation verbs on the `gemmguard` parser."""
    ev = verbs.add_parser(
        "eval",
        help="Run an lm-eval config against a running server and judge it.",
        description="Run the lm-eval tasks of CONFIG (a file from evals/) against the server's "
        "OpenAI API, offline, and compare every metric with the config's expectation: a metric "
        "passes if measured >= value * (1 - rtol). Prints a verdict, writes a JSON result, and "
        "exits 1 if any metric is below tolerance (2 if the eval could not run).",
    )
    ev.add_argument("config", metavar="CONFIG", help="Eval config YAML, e.g. evals/demo-cpu.yaml.")
    _add_common(ev)
    ev.add_argument("--model", metavar="NAME",
                    help="Served model name to send. Default: the config's model_name, which "
                    "the server must serve.")
    ev.add_argument("--limit", type=_positive_int, metavar="N",
                    help="Evaluate only the first N samples of each task (a smoke test). "
                    "Default: the config's limit, or every sample.")
    ev.add_argument("--concurrency", type=_positive_int, default=8, metavar="N",
                    help="Requests in flight at once. Default: 8.")
    ev.add_argument("--tasks-dir", metavar="DIR",
                    help="Folder of lm-eval task YAML files. Default: tasks/ beside CONFIG.")
    ev.set_defaults(handler=_eval)

    ek = verbs.add_parser(
        "eval-kernels",
        help="Compare greedy outputs of two servers of one model (kernel swap).",
        description="Send the same prompts, greedy, to a server (the kernels under test) and a "
        "reference server (another kernel choice, e.g. started with --deny-kernel) and report "
        "token agreement, first divergence and mean KL of the top log-probabilities. Needs no "
        "labelled data. Writes a JSON report and exits 1 below --min-agreement or above "
        "--max-mean-kl.",
    )
    _add_common(ek)
    ek.add_argument("--reference-url", required=True, metavar="URL",
                    help="The reference server (same model, other kernels). Required.")
    ek.add_argument("--model", metavar="NAME",
                    help="Served model name. Default: the only model each server serves.")
    ek.add_argument("--reference-model", metavar="NAME",
                    help="Served model name on the reference server. Default: --model.")
    ek.add_argument("--prompts", metavar="FILE",
                    help="Prompts: a JSON list of strings (.json) or one per line. "
                    "Default: twelve built-in short prompts.")
    ek.add_argument("--max-tokens", type=_positive_int, default=32, metavar="N",
                    help="Tokens generated per prompt. Default: 32.")
    ek.add_argument("--top-logprobs", type=_positive_int, default=20, metavar="K",
                    help="Log-probabilities per position, at most the server's --max-logprobs "
                    "(vLLM's default 20). Default: 20.")
    ek.add_argument("--min-agreement", type=_fraction, default=0.9, metavar="X",
                    help="Fail below this token agreement (0 to 1). Default: 0.9.")
    ek.add_argument("--max-mean-kl", type=_non_negative, metavar="NATS",
                    help="Also fail above this mean KL. Default: no KL limit.")
    ek.set_defaults(handler=_eval_kernels)
