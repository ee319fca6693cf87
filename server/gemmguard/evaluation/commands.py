"""`gemmguard eval` and `gemmguard eval-kernels` (being built)."""

from __future__ import annotations

import argparse


def add_eval_commands(verbs: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the evaluation verbs on the `gemmguard` parser."""
