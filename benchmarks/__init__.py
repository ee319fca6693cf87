"""What gemmguard costs on top of vLLM, measured side by side: `python -m benchmarks --help`.

Modules: `stats` (percentiles, ratios, spread), `compare` (gemmguard against plain: ratios,
goals, noise), `load` (the loopback client), `servers` (starting, timing and sampling the
two servers), `kernels` (issue 4's portable FP8 kernel timing), `machine` (versions and
host), `runner` (the sections), `report` and `formatting` (Markdown, JSON, summary), `cli`.
"""

from __future__ import annotations

__all__: list[str] = []
