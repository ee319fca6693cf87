"""gemmguard: vLLM with known engine fixes, GEMM self-checks and per-layer kernel metrics."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
