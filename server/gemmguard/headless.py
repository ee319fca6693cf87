"""What a headless node's pod serves: /metrics, while vLLM runs workers there and no API server.

A multi-node replica's workers run `gemmguard serve --headless`. What concerns their ranks (the
kernels, the self-check, the fixes, the build) reaches Prometheus through the leader, which
gathers every rank's report over vLLM's own channels. What only the node's own pod can say is
served here, on the port the API server would have used: that the node is up (Prometheus's
`up`), the build its server process runs (`rank` empty: this process holds no model), its
restarts, and when its state directory began (a LeaderWorkerSet group recreation replaces it).
A refusal on this node's ranks ends this process; the supervisor then lingers on the same port
with the report (`refusal.py`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server

from gemmguard.build import build_info
from gemmguard.counter_store import CounterStore
from gemmguard.metrics import PodStateMetrics, build_info_gauge, build_labels

logger = logging.getLogger("vllm.gemmguard")


def node_registry(state_dir: Path | None) -> CollectorRegistry:
    """The series a headless node's pod exports."""
    registry = CollectorRegistry()
    build_info_gauge(registry).labels(*build_labels(build_info())).set(1)
    PodStateMetrics(registry, CounterStore(state_dir) if state_dir is not None else None)
    return registry


def serve_metrics(host: str | None, port: int, state_dir: Path | None) -> None:
    """Serve the node's /metrics on host:port from a daemon thread, for the process's life."""
    start_http_server(port, addr=host or "0.0.0.0", registry=node_registry(state_dir))
    logger.info("gemmguard: headless node; its /metrics on port %d (this node's ranks are "
                "reported by the leader)", port)
