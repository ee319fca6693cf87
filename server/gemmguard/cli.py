"""`gemmguard` command line: verb subcommands (serve, demo-model, …)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gemmguard
from gemmguard.errors import GemmguardError


def _demo_model(args: argparse.Namespace) -> int:
    from gemmguard.demo import DemoSpec, write_demo_model

    spec = DemoSpec(
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.moe_intermediate_size,
    )
    out = write_demo_model(Path(args.out), args.scheme, args.seed, spec, args.arch, args.stress)
    print(f"Wrote the {args.arch} {args.scheme} demo checkpoint (seed {args.seed}) to {out}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from gemmguard.launcher import serve

    return serve(args.serve_args)


def _kernels(args: argparse.Namespace) -> int:
    import json

    from gemmguard.offline import format_kernel_table, start_engine

    engine = start_engine(args.model, args.vllm_args, args.deny_kernel)
    ranks = engine.collective_rpc("gemmguard_kernel_report")
    print(json.dumps(ranks, indent=2) if args.json else format_kernel_table(ranks))
    return 0


def _selfcheck(args: argparse.Namespace) -> int:
    import json
    import os
    import tempfile

    from gemmguard.config import PREFIX
    from gemmguard.launcher import refusal_report
    from gemmguard.offline import start_engine
    from gemmguard.selfcheck.policy import Outcome, exit_code

    with tempfile.TemporaryDirectory(prefix="gemmguard-selfcheck-") as tmp:
        report_file = Path(tmp) / "selfcheck.json"
        # The engine's processes read the policies at load, from the environment they inherit.
        os.environ.update({PREFIX + "SELFCHECK_POLICY": args.policy,
                           PREFIX + "SELFCHECK_UNCHECKED": args.selfcheck_unchecked,
                           PREFIX + "SELFCHECK_REPORT_FILE": str(report_file)})
        try:
            engine = start_engine(args.model, args.vllm_args, args.deny_kernel)
            report = Outcome(args.policy, engine.collective_rpc("gemmguard_selfcheck"),
                             args.selfcheck_unchecked).as_dict()
        except Exception:
            # A refusing check stops the engine's start-up: its report is the answer.
            refused = refusal_report(report_file)
            if refused is None:
                raise
            report = refused
    print(json.dumps(report, indent=2) if args.json else report["summary"])
    return exit_code(Outcome.of_report(report))


def _fixes(args: argparse.Namespace) -> int:
    import json

    from gemmguard import fixes

    report = fixes.apply_all()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    width = max(len(row["fix"]) for row in report)
    for row in report:
        print(f"{row['fix']:<{width}}  {row['state']:<14}  {row['detail']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `gemmguard` parser with one subparser per verb."""
    parser = argparse.ArgumentParser(
        prog="gemmguard",
        description="vLLM with known engine fixes, GEMM self-checks and per-layer kernel metrics.",
    )
    parser.add_argument("--version", action="version", version=gemmguard.__version__)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    serve = verbs.add_parser(
        "serve",
        help="Serve the OpenAI API with vLLM's own server and gemmguard's checks.",
        description="Serve MODEL (default: the demo model) with vLLM's OpenAI-compatible "
        "server. Options not listed here are vLLM's own and are passed on unchanged "
        "(e.g. --port, --max-model-len, --tensor-parallel-size).",
        usage="gemmguard serve [MODEL] [gemmguard options] [vLLM options]",
    )
    from gemmguard.serve_plan import add_deny_option, add_serve_options

    add_serve_options(serve)
    serve.set_defaults(handler=_serve)

    from gemmguard.demo.checkpoint import ARCHITECTURES, SCHEMES

    demo = verbs.add_parser(
        "demo-model",
        help="Write a deterministic tiny Qwen3 or Qwen3-MoE checkpoint.",
        description="Write a tiny Qwen3 (or Qwen3-MoE) checkpoint with a local tokenizer and "
        "chat template. The same seed gives byte-identical files. w4a16-g128, w4a8-g128, "
        "w4a8-int8-g128, nvfp4, w8a8-int8, fp8-dynamic, w8a16-g128 and mxfp4a16 are "
        "compressed-tensors checkpoints written by its own compressors.",
    )
    demo.add_argument("--scheme", choices=SCHEMES, default="bf16",
                      help="Weight format. Default: bf16.")
    demo.add_argument("--arch", choices=ARCHITECTURES, default="qwen3",
                      help="Architecture: dense Qwen3 or Qwen3-MoE (routed experts in every "
                      "layer). Default: qwen3.")
    demo.add_argument("--out", required=True, help="Folder to write the checkpoint into.")
    demo.add_argument("--seed", type=int, default=0, help="Random seed. Default: 0.")
    demo.add_argument("--layers", type=int, default=2, help="Decoder layers. Default: 2.")
    demo.add_argument("--hidden-size", type=int, default=256,
                      help="Hidden size, a multiple of 128. Default: 256.")
    demo.add_argument("--intermediate-size", type=int, default=512,
                      help="MLP width, a multiple of 128. Default: 512.")
    demo.add_argument("--experts", type=int, default=8,
                      help="Routed experts per layer (qwen3-moe). Default: 8.")
    demo.add_argument("--top-k", type=int, default=2,
                      help="Experts per token (qwen3-moe). Default: 2.")
    demo.add_argument("--moe-intermediate-size", type=int, default=256,
                      help="Expert MLP width, a multiple of 128 (qwen3-moe; W4A8 experts "
                      "need a multiple of 256). Default: 256.")
    demo.add_argument("--stress", action="store_true",
                      help="Outlier input channels and extreme-scale blocks in every weight "
                      "(the checkpoints kernels are recorded on for the self-check's "
                      "calibration).")
    demo.set_defaults(handler=_demo_model)

    kernels = verbs.add_parser(
        "kernels",
        help="Load MODEL offline and print the kernel each layer runs.",
        description="Load MODEL with vLLM (no server) and print, per layer, the kernel vLLM "
        "chose and the candidates it turned down. Unknown options are vLLM's.",
    )
    kernels.add_argument("model", help="Checkpoint folder or Hugging Face model id.")
    kernels.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    add_deny_option(kernels)
    kernels.set_defaults(handler=_kernels)

    fixes = verbs.add_parser(
        "fixes",
        help="Show each engine fix gemmguard carries and its state on this installation.",
        description="Detect each carried engine fix from the installed vLLM's behaviour, patch "
        "what is missing (in this process, as every gemmguard engine process does), and print "
        "the states: upstream, patched, missing, not_applicable, unknown.",
    )
    fixes.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    fixes.set_defaults(handler=_fixes)

    selfcheck = verbs.add_parser(
        "selfcheck",
        help="Load MODEL offline and check every layer's kernel against a reference GEMM.",
        description="Load MODEL with vLLM (no server), compare each layer's kernel with a "
        "reference GEMM built from the checkpoint, print the report. Exit 0 when every layer "
        "was checked and passed; 1 when a layer is degraded or broken, or was not checked "
        "(unless --selfcheck-unchecked allow); 3 when the check refuses to serve (policy "
        "fallback without a passing replacement, or --selfcheck-unchecked fail). Unknown "
        "options are vLLM's.",
    )
    selfcheck.add_argument("model", help="Checkpoint folder or Hugging Face model id.")
    selfcheck.add_argument("--json", action="store_true", help="Print the full JSON report.")
    selfcheck.add_argument(
        "--policy", choices=("warn", "fallback"), default="warn",
        help="warn: report the kernels vLLM chose; fallback: also replace failing ones in "
        "place and report the replacements. Default: warn.")
    selfcheck.add_argument(
        "--selfcheck-unchecked", choices=("allow", "warn", "fail"), default="warn",
        help="Layers the check could not check (no reference for their scheme, or not seen "
        "by it): allow (exit 0 if the rest passed), warn (exit 1), fail (refuse: exit 3). "
        "Default: warn.")
    add_deny_option(selfcheck)
    selfcheck.set_defaults(handler=_selfcheck)

    from gemmguard.evaluation.commands import add_eval_commands

    add_eval_commands(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one gemmguard command; errors end with one clear line and a non-zero exit."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"] and not {"-h", "--help"} & set(argv):
        # vLLM's options are not known here; `serve` takes everything after the verb, and
        # builds no parser: the parsers' imports (torch, for the demo's choices) would delay
        # the server's start.
        args = argparse.Namespace(handler=_serve, serve_args=argv[1:])
    elif argv[:1] in (["kernels"], ["selfcheck"]):
        args, vllm_args = build_parser().parse_known_args(argv)
        args.vllm_args = vllm_args
    else:
        args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except GemmguardError as exc:
        print(f"gemmguard {argv[0] if argv else ''}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
