"""What `gemmguard serve` shows while it refuses to serve: the self-check report, for Prometheus.

Under `--selfcheck-policy fail` the engine stops before vLLM's server ever answers, so the pod's
/metrics, where Prometheus would learn why, never exists, and the report dies with the container.
For `--selfcheck-refusal-linger` seconds the supervisor serves on the server's own host and port:

    GET /metrics                  gemmguard_selfcheck_* from the report, gemmguard_build_info and
                                  gemmguard_selfcheck_refusals_total (kept in GEMMGUARD_STATE_DIR)
    GET /gemmguard/v1/selfcheck   the report itself
    GET /gemmguard/ready, /live   503 with the report's summary
    anything else                 404

and nothing else: no OpenAI API, no /health. Then it exits 3 and the kubelet's restart repeats the
check. In a pod the linger never trips the liveness probe: the kubelet starts that only after the
start-up probe (/gemmguard/ready, 503 here) succeeded.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from gemmguard.config import Settings
from gemmguard.counter_store import CounterStore, PersistedCounter
from gemmguard.metrics import SelfcheckMetrics, build_info_gauge, build_labels
from gemmguard.selfcheck.policy import Outcome

logger = logging.getLogger("gemmguard.refusal")

REFUSALS = "gemmguard_selfcheck_refusals_total"


def refusal_registry(report: Mapping[str, Any], settings: Settings,
                     build: Mapping[str, str] | None = None) -> CollectorRegistry:
    """A registry with the report's series and the refusal counter, counted once more.

    The self-check's series come from the serving server's own exporter
    (`metrics.SelfcheckMetrics`), fed the same report: same help, same rules.
    """
    registry = CollectorRegistry()
    SelfcheckMetrics(registry).publish(Outcome.of_report(report),
                                       per_layer=settings.per_layer_metrics)
    if build is not None:
        build_info_gauge(registry).labels(*build_labels(build)).set(1)
    state = settings.state_dir
    refusals = PersistedCounter(
        REFUSALS,
        "Times the server refused to serve by its start-up self-check (a failing kernel, or "
        "unchecked layers under --selfcheck-unchecked fail); kept across container restarts "
        "in GEMMGUARD_STATE_DIR.",
        registry=registry,
        store=CounterStore(state) if state is not None else None,
    )
    refusals.restore()
    refusals.inc()
    return registry


def _json(handler: BaseHTTPRequestHandler, status: int, body: Any) -> None:
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _handler(registry: CollectorRegistry, report: Mapping[str, Any]) -> type:
    summary = str(report.get("summary") or "the start-up self-check failed")
    reason = f"refusing to serve: {summary}"

    class RefusalHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                data = encoder(registry)
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            elif path == "/gemmguard/v1/selfcheck":
                _json(self, 200, report)
            elif path == "/gemmguard/ready":
                _json(self, 503, {"ready": False, "reason": reason})
            elif path == "/gemmguard/live":
                _json(self, 503, {"live": False, "reason": reason})
            else:
                _json(self, 404, {"error": f"{path} is not served while gemmguard refuses to "
                                  "serve; /metrics and /gemmguard/v1/selfcheck are."})

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # probes every few seconds would drown the report in the log

    return RefusalHandler


def _http_server(host: str | None, port: int, handler: type) -> ThreadingHTTPServer:
    bind = host or "0.0.0.0"
    server_cls = _ThreadingHTTPServerV6 if ":" in bind else ThreadingHTTPServer
    return server_cls((bind, port), handler)


class _ThreadingHTTPServerV6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _build_info() -> dict[str, str] | None:
    try:
        from gemmguard.build import build_info

        return build_info()
    except Exception as exc:  # the report matters more than the version labels
        logger.warning("gemmguard: no build info for the refusal's /metrics: %r", exc)
        return None


def linger(report: Mapping[str, Any], host: str | None, port: int, settings: Settings,
           stop: threading.Event | None = None) -> None:
    """Serve the refusal for settings.selfcheck_refusal_linger seconds, or until SIGTERM/SIGINT.

    `stop` ends it early too (tests). Returns at once when the linger is 0.
    """
    seconds = settings.selfcheck_refusal_linger
    if seconds <= 0:
        return
    registry = refusal_registry(report, settings, _build_info())
    try:
        server = _http_server(host, port, _handler(registry, report))
    except OSError as exc:
        print(f"gemmguard: cannot serve the self-check report on {host or '*'}:{port} "
              f"({exc.strerror}); exiting without the refusal linger.", file=sys.stderr,
              flush=True)
        return
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, name="gemmguard-refusal", daemon=True)
    thread.start()
    print(f"gemmguard: refusing to serve. /metrics and /gemmguard/v1/selfcheck stay up on "
          f"{host or '*'}:{port} for {seconds:g} s (--selfcheck-refusal-linger), then the "
          "server exits 3.", file=sys.stderr, flush=True)
    try:
        stop.wait(seconds)
    finally:
        server.shutdown()
        server.server_close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
