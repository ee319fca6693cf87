"""Deterministic tiny checkpoints for the embedded default and the tests."""

from __future__ import annotations

from gemmguard.demo.checkpoint import ARCHITECTURES, SCHEMES, DemoSpec, write_demo_model

__all__ = ["ARCHITECTURES", "SCHEMES", "DemoSpec", "write_demo_model"]
