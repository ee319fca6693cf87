"""gemmguard's series on vLLM's own /metrics (names: docs/design.md, "The contract").

The API server publishes what it gathered from the workers. Gauges use
`multiprocess_mode="mostrecent"` so that with several API servers (vLLM's Prometheus
multiprocess mode, where custom collectors are not exposed) each series appears once;
counters, which that mode sums over processes, are published by API server 0 only.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter as Tally
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from gemmguard.config import settings
from gemmguard.counter_store import STARTS, CounterStore, PersistedCounter

BUILD_LABELS = ("version", "vllm_version", "vllm_verified", "torch_version", "platform",
                "device", "rank")
BUILD_INFO_HELP = ("gemmguard, vLLM and torch versions, platform and device, per rank (always 1; "
                   "rank empty for a process that holds no model, e.g. a refusing server). "
                   "vllm_verified: how that vLLM was verified: run, source (its source only) "
                   "or none.")
LAYER_LABELS = ("layer", "layer_type", "scheme", "kernel", "rank")
AGGREGATE_LABELS = ("kernel", "scheme", "layer_type")
FALLBACK_LABELS = ("layer_type", "scheme", "preferred", "chosen", "reason")
# Reasons are vLLM's own sentences; long ones are cut so a label stays readable and bounded.
MAX_LABEL_CHARS = 160
# Every reason canary.py counts a failure under. Each series exists at 0 from the start, so the
# first failure is an increase Prometheus can see (a series born at 1 shows no increase()).
CANARY_REASONS = ("timeout", "engine_dead", "error")


def bounded_label(value: object, limit: int = MAX_LABEL_CHARS) -> str:
    """A label value with whitespace collapsed and at most `limit` characters."""
    text = re.sub(r"\s+", " ", str(value)).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def build_labels(info: Mapping[str, Any]) -> tuple[str, ...]:
    """gemmguard_build_info's label values from one process's or rank's build info."""
    return tuple(str(info.get(label, "")) for label in BUILD_LABELS)


def _gauge(registry: CollectorRegistry | None, name: str, doc: str,
           labels: Iterable[str] = ()) -> Gauge:
    return Gauge(name, doc, tuple(labels), multiprocess_mode="mostrecent", registry=registry)


def build_info_gauge(registry: CollectorRegistry | None) -> Gauge:
    """gemmguard_build_info: one definition for the serving server and the refusing one."""
    return _gauge(registry, "gemmguard_build_info", BUILD_INFO_HELP, BUILD_LABELS)


class SelfcheckMetrics:
    """The gemmguard_selfcheck_* gauges, one definition for the serving server and for the
    refusing one (`refusal.py`), so both say the same thing of the same report."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        self.passed = _gauge(
            registry, "gemmguard_selfcheck_passed",
            "1 when every GEMM-owning layer was checked and none runs a degraded or broken "
            "kernel, else 0 (an incomplete check is not passed: gemmguard_selfcheck_complete).")
        self.complete = _gauge(
            registry, "gemmguard_selfcheck_complete",
            "1 when every GEMM-owning layer was checked, 0 when some are unchecked or were "
            "not seen by the check.")
        self.policy = _gauge(
            registry, "gemmguard_selfcheck_policy_info",
            "The policies the self-check ran under (always 1): policy (warn, fallback, fail) "
            "for failing layers, unchecked (allow, warn, fail) for layers it could not check.",
            ("policy", "unchecked"))
        self.layers = _gauge(
            registry, "gemmguard_selfcheck_layers",
            "Layers per self-check result of the kernel they serve with "
            "(pass, degraded, broken, unchecked).", ("result",))
        self.rejected_layers = _gauge(
            registry, "gemmguard_selfcheck_rejected_layers",
            "Layers whose kernel the self-check rejected at load, by rejected kernel and its "
            "verdict (the layer then serves on a replacement, or start-up refused).",
            ("kernel", "result"))
        self.replacement_cost = _gauge(
            registry, "gemmguard_selfcheck_replacement_cost_ratio",
            "Time of the replacement kernel over the rejected one on the layer's shape "
            "(median over the layers replaced by this pair).", ("rejected", "replacement"))
        self.duration = _gauge(
            registry, "gemmguard_selfcheck_duration_seconds",
            "Seconds the start-up self-check took on the slowest rank.")
        self.excess_bits = _gauge(
            registry, "gemmguard_selfcheck_excess_bits",
            "Bits a layer's kernel loses against what its quantization scheme allows.",
            ("layer", "kernel"))

    def publish(self, outcome: Any, *, per_layer: bool = True) -> None:
        """Export a self-check outcome (selfcheck.policy.Outcome)."""
        self.passed.set(1 if outcome.passed else 0)
        self.complete.set(1 if outcome.complete else 0)
        self.policy.clear()
        self.policy.labels(outcome.policy, outcome.unchecked_policy).set(1)
        for result, count in outcome.counts().items():
            self.layers.labels(result).set(count)
        self.duration.set(outcome.seconds())
        self.rejected_layers.clear()
        rejected = Tally((bounded_label(kernel), verdict) for kernel, verdict in outcome.rejected())
        for (kernel, result), count in sorted(rejected.items()):
            self.rejected_layers.labels(kernel, result).set(count)
        costs: dict[tuple[str, str], list[float]] = {}
        for item in outcome.replacements():
            if item.get("kernel") and item.get("cost_ratio") is not None:
                pair = (bounded_label(item["rejected"]), bounded_label(item["kernel"]))
                costs.setdefault(pair, []).append(float(item["cost_ratio"]))
        self.replacement_cost.clear()
        for pair, ratios in costs.items():
            self.replacement_cost.labels(*pair).set(statistics.median(ratios))
        self.excess_bits.clear()
        if per_layer:
            for layer in outcome.layers:
                bits = layer.get("excess_bits")
                # Unchecked layers and non-finite measurements have no number to export.
                if bits is None or not math.isfinite(float(bits)):
                    continue
                self.excess_bits.labels(
                    bounded_label(layer["layer"]), bounded_label(layer["kernel"])
                ).set(float(bits))


class PodStateMetrics:
    """What a pod's state directory (GEMMGUARD_STATE_DIR) says of the pod's life: its server's
    restarts, and when the directory, and so every persisted total, began. One definition for
    the API server and for a headless worker node (`headless.py`)."""

    def __init__(self, registry: CollectorRegistry | None, store: CounterStore | None) -> None:
        self.server_restarts = PersistedCounter(
            "gemmguard_server_restarts_total",
            "Times the server came up again with the same GEMMGUARD_STATE_DIR (in the chart: "
            "container restarts within one pod, after a crash during load or serving, an OOM "
            "kill or a liveness kill). Starts over with the pod: see "
            "gemmguard_state_created_timestamp_seconds.",
            registry=registry, store=store,
        )
        # Only the first process to claim the directory restores (counter_store.py).
        self.claimed = store is not None and store.claim()
        if store is None:  # nothing persists: no creation time to tell of
            return
        _gauge(registry, "gemmguard_state_created_timestamp_seconds",
               "When this pod's GEMMGUARD_STATE_DIR was first used (Unix seconds), so when the "
               "persisted counters began. A new value under the same pod name means the pod "
               "was replaced (a LeaderWorkerSet group recreation) and the counters started "
               "over.").set(store.created())
        if self.claimed:
            self.server_restarts.restore()
            # The server process counted this start before vLLM began (`count_start`), and
            # so every earlier one, those that crashed while loading included.
            if store.totals(STARTS).get((), 0.0) > 1:
                self.server_restarts.inc()


class Metrics:
    """The gemmguard metric families of one API-server process."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY,
                 state_dir: Path | None = None) -> None:
        """`state_dir` (GEMMGUARD_STATE_DIR) keeps the liveness counters across restarts."""
        store = CounterStore(state_dir) if state_dir is not None else None

        def gauge(name: str, doc: str, labels: Iterable[str] = ()) -> Gauge:
            return _gauge(registry, name, doc, labels)

        self.build_info = build_info_gauge(registry)
        self.layer_kernel_info = gauge(
            "gemmguard_layer_kernel_info",
            "The GEMM kernel each layer runs, per rank (always 1).",
            LAYER_LABELS,
        )
        self.kernel_layers = gauge(
            "gemmguard_kernel_layers",
            "Number of layers (over all ranks) running each kernel.",
            AGGREGATE_LABELS,
        )
        self.kernel_fallback = Counter(
            "gemmguard_kernel_fallback_total",
            "Layers whose earlier-priority kernel candidates were turned down, one count per "
            "turned-down candidate, with the kernel finally chosen and the reason.",
            FALLBACK_LABELS,
            registry=registry,
        )

        self.selfcheck = SelfcheckMetrics(registry)

        self.engine_fix_info = gauge(
            "gemmguard_engine_fix_info",
            "Each carried engine fix and its state on each rank: upstream, patched, missing, "
            "not_applicable or unknown (a rank on another node may differ).",
            ("fix", "state", "rank"),
        )
        self.hook_missing = gauge(
            "gemmguard_hook_missing",
            "1 for each gemmguard hook that found nothing to attach to in this rank's vLLM "
            "(what is lost without it: the log, /gemmguard/v1/build); none on a verified vLLM.",
            ("hook", "rank"),
        )
        self.engine_live = gauge(
            "gemmguard_engine_live",
            "1 while the engine generates tokens (for requests or the idle canary); 0 from a "
            "failed or late canary until the engine generates tokens again. One series per "
            "data-parallel engine (engine: its rank).",
            ("engine",),
        )
        self.canary_latency = Histogram(
            "gemmguard_canary_latency_seconds",
            "Latency of the 1-token canary generation sent when the server is idle.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        # Liveness counters outlive the process (counter_store.py): the failures that get a
        # container restarted must still show, and alert, after the restart.
        self.canary_failures = PersistedCounter(
            "gemmguard_canary_failures_total",
            "Canary generations that failed, by reason (timeout, engine_dead, error); kept "
            "across restarts of the server in GEMMGUARD_STATE_DIR.",
            ("reason",),
            registry=registry, store=store,
        )
        for reason in CANARY_REASONS:
            self.canary_failures.labels(reason)
        self.pod_state = PodStateMetrics(registry, store)
        if self.pod_state.claimed:
            self.canary_failures.restore()

    def publish_fixes(self, per_rank: Iterable[tuple[object, Iterable[Mapping[str, str]]]]
                      ) -> None:
        """One series per fix and rank, value 1, its state as a label."""
        self.engine_fix_info.clear()
        for rank, report in per_rank:
            for row in report:
                self.engine_fix_info.labels(row["fix"], row["state"], str(rank)).set(1)

    def publish_selfcheck(self, outcome: Any, *, per_layer: bool = True) -> None:
        """Export a self-check outcome (selfcheck.policy.Outcome)."""
        self.selfcheck.publish(outcome, per_layer=per_layer)

    def publish_build(self, infos: Iterable[Mapping[str, Any]]) -> None:
        """Set gemmguard_build_info from each rank's build info (its `rank` a label), and
        gemmguard_hook_missing from the hooks each rank could not attach."""
        self.build_info.clear()
        self.hook_missing.clear()
        for info in infos:
            self.build_info.labels(*build_labels(info)).set(1)
            for hook in filter(None, str(info.get("hooks_missing") or "").split(",")):
                self.hook_missing.labels(hook, str(info.get("rank", ""))).set(1)

    def publish_kernels(self, rows: Iterable[Mapping[str, Any]], *, per_layer: bool = True,
                        count_fallbacks: bool = True) -> None:
        """Export the kernel report: per-layer info, per-kernel counts, fallbacks."""
        rows = list(rows)
        self.layer_kernel_info.clear()
        self.kernel_layers.clear()
        if per_layer:
            for row in rows:
                self.layer_kernel_info.labels(
                    *(bounded_label(row.get(label, "")) for label in LAYER_LABELS)
                ).set(1)
        tally = Tally(tuple(bounded_label(row[label]) for label in AGGREGATE_LABELS)
                      for row in rows)
        for labels, count in tally.items():
            self.kernel_layers.labels(*labels).set(count)
        if not count_fallbacks:
            return
        for row in rows:
            for attempt in row.get("turned_down", ()):
                self.kernel_fallback.labels(
                    bounded_label(row["layer_type"]),
                    bounded_label(row["scheme"]),
                    bounded_label(attempt["kernel"]),
                    bounded_label(row["kernel"]),
                    bounded_label(attempt["reason"] or "unsupported"),
                ).inc()


_PROCESS_METRICS: Metrics | None = None


def process_metrics() -> Metrics:
    """The metric families registered on the global registry, created once per process."""
    global _PROCESS_METRICS
    if _PROCESS_METRICS is None:
        _PROCESS_METRICS = Metrics(state_dir=settings().state_dir)
    return _PROCESS_METRICS
