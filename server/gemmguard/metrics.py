"""gemmguard's series on vLLM's own /metrics (names: ../shared/DESIGN.md, "The contract").

The API server publishes what it gathered from the workers. Gauges use
`multiprocess_mode="mostrecent"` so that with several API servers (vLLM's Prometheus
multiprocess mode, where custom collectors are not exposed) each series appears once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Gauge

BUILD_LABELS = ("version", "vllm_version", "torch_version", "platform", "device")


class Metrics:
    """The gemmguard metric families of one API-server process."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        kwargs: dict[str, Any] = {"registry": registry}
        self.build_info = Gauge(
            "gemmguard_build_info",
            "gemmguard, vLLM and torch versions, platform and device (always 1).",
            BUILD_LABELS,
            multiprocess_mode="mostrecent",
            **kwargs,
        )

    def publish_build(self, info: Mapping[str, Any]) -> None:
        """Set gemmguard_build_info from one process's build info."""
        self.build_info.clear()
        self.build_info.labels(*(str(info.get(label, "")) for label in BUILD_LABELS)).set(1)


_PROCESS_METRICS: Metrics | None = None


def process_metrics() -> Metrics:
    """The metric families registered on the global registry, created once per process."""
    global _PROCESS_METRICS
    if _PROCESS_METRICS is None:
        _PROCESS_METRICS = Metrics()
    return _PROCESS_METRICS
