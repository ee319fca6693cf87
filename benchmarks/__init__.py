"""gemmguard against plain vLLM, measured with vLLM's own `vllm bench serve`: `make bench`.

Modules: `vllm_cli` (runs vLLM's command line, the one place that does), `servers` (the CPU
run's servers: start-up split, freeze, memory), `cli` (the CPU A/B and A/A driver behind
`make bench`), `comparison` (ratios and spread from vLLM's result JSONs; also summarizes the GPU
run of scripts/gpu-bench.sh), `kernels` (the portable FP8 kernels' speed).
"""

from __future__ import annotations

__all__: list[str] = []
