"""vLLM stat-logger plugin: counts the tokens the engine generated, liveness's only evidence.

vLLM's output handler calls every stat logger once per batch of engine outputs (once per engine
step, not per request), in the API server process the outputs belong to; this one adds the
batch's generated tokens to `gemmguard.canary.ENGINE_TOKENS` under its engine's index (vLLM builds
one per data-parallel engine). It is the `vllm.stat_logger_plugins`
entry `gemmguard_api`, the same name as the endpoint plugin, so the `VLLM_PLUGINS` entry that adds
/gemmguard/live also adds its evidence. vLLM keeps its own Prometheus stat logger beside it (it
drops that one only for a plugin that is itself a `PrometheusStatLogger`).
"""

from __future__ import annotations

from typing import Any

from gemmguard import vllm_adapter
from gemmguard.canary import ENGINE_TOKENS


# The base is vLLM's StatLoggerBase, found at run time; mypy cannot check a called base.
class TokenStatLogger(vllm_adapter.stat_logger_base()):  # type: ignore[misc]
    """Adds each step of its engine's generated tokens to this process's tally; logs nothing."""

    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        self.engine_index = engine_index
        self._tally = ENGINE_TOKENS
        self._tally.loggers += 1

    def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
        # vLLM builds no IterationStats for a batch without outputs (an abort, an idle stats beat).
        if iteration_stats is not None:
            self._tally.add(self.engine_index, iteration_stats.num_generation_tokens)

    def log_engine_initialized(self) -> None:
        pass
