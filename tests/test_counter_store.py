"""Counters that outlive their process: totals in GEMMGUARD_STATE_DIR, restored once per start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry

from gemmguard.counter_store import TOTALS_FILE, CounterStore, count_start
from gemmguard.metrics import CANARY_REASONS, Metrics

HOLD_CLAIM = """
import sys, time
from gemmguard.counter_store import CounterStore
store = CounterStore(sys.argv[1])
print("claimed" if store.claim() else "refused", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def _restart(state: Path, previous: Metrics | None) -> tuple[Metrics, CollectorRegistry]:
    """A new server process: the old one's claim ends with it, a new registry starts empty."""
    if previous is not None:
        for counter in (previous.canary_failures, previous.pod_state.server_restarts):
            if counter.store is not None:
                counter.store.release()
    count_start(state)  # the server process does, before vLLM starts
    registry = CollectorRegistry()
    return Metrics(registry, state_dir=state), registry


def test_every_canary_reason_is_exported_at_zero_before_any_failure() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    for reason in CANARY_REASONS:
        assert _value(registry, "gemmguard_canary_failures_total", reason=reason) == 0
    assert _value(registry, "gemmguard_server_restarts_total") == 0


def test_canary_failures_and_restarts_survive_a_restart(tmp_path: Path) -> None:
    metrics, registry = _restart(tmp_path, None)
    metrics.canary_failures.labels("timeout").inc()
    metrics.canary_failures.labels("timeout").inc()
    metrics.canary_failures.labels("engine_dead").inc()
    assert _value(registry, "gemmguard_canary_failures_total", reason="timeout") == 2

    metrics, registry = _restart(tmp_path, metrics)
    assert _value(registry, "gemmguard_canary_failures_total", reason="timeout") == 2
    assert _value(registry, "gemmguard_canary_failures_total", reason="engine_dead") == 1
    assert _value(registry, "gemmguard_canary_failures_total", reason="error") == 0
    assert _value(registry, "gemmguard_server_restarts_total") == 1

    metrics.canary_failures.labels("timeout").inc()
    metrics, registry = _restart(tmp_path, metrics)
    assert _value(registry, "gemmguard_canary_failures_total", reason="timeout") == 3
    assert _value(registry, "gemmguard_server_restarts_total") == 2


def test_a_start_that_crashed_while_loading_counts_the_next_start_as_a_restart(
        tmp_path: Path) -> None:
    count_start(tmp_path)  # this start never reached its API server: the engine died loading
    _, registry = _restart(tmp_path, None)
    assert _value(registry, "gemmguard_server_restarts_total") == 1


def test_without_a_state_dir_nothing_is_kept(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    Metrics(registry).canary_failures.labels("timeout").inc()
    registry = CollectorRegistry()
    Metrics(registry)
    assert _value(registry, "gemmguard_canary_failures_total", reason="timeout") == 0
    assert list(tmp_path.iterdir()) == []


def test_a_second_live_process_adds_but_does_not_restore(tmp_path: Path) -> None:
    # Several API servers: their counters are summed, so only the first restores the old total.
    CounterStore(tmp_path).add("gemmguard_canary_failures_total", ("timeout",), 5)
    first = CollectorRegistry()
    Metrics(first, state_dir=tmp_path)
    second = CollectorRegistry()
    other = Metrics(second, state_dir=tmp_path)
    assert _value(first, "gemmguard_canary_failures_total", reason="timeout") == 5
    assert _value(second, "gemmguard_canary_failures_total", reason="timeout") == 0
    other.canary_failures.labels("timeout").inc()
    totals = CounterStore(tmp_path).totals("gemmguard_canary_failures_total")
    assert totals[("timeout",)] == 6


def test_the_claim_is_held_by_a_live_process_and_dropped_when_it_exits(tmp_path: Path) -> None:
    # `with` closes the pipe too: an unclosed one is a ResourceWarning, an error in the tests.
    with subprocess.Popen([sys.executable, "-c", HOLD_CLAIM, str(tmp_path), "60"],
                          stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "claimed"
            assert CounterStore(tmp_path).claim() is False
        finally:
            holder.kill()
    assert CounterStore(tmp_path).claim() is True


def test_an_unreadable_totals_file_starts_from_zero(tmp_path: Path) -> None:
    (tmp_path / TOTALS_FILE).write_text("{not json")
    registry = CollectorRegistry()
    metrics = Metrics(registry, state_dir=tmp_path)
    assert _value(registry, "gemmguard_canary_failures_total", reason="timeout") == 0
    metrics.canary_failures.labels("timeout").inc()
    assert CounterStore(tmp_path).totals("gemmguard_canary_failures_total") == {("timeout",): 1.0}


def test_the_persisted_child_is_the_counter_child_otherwise(tmp_path: Path) -> None:
    # canary.py and its tests read a child as prometheus_client hands it out.
    metrics = Metrics(CollectorRegistry(), state_dir=tmp_path)
    metrics.canary_failures.labels("error").inc()
    assert metrics.canary_failures.labels("error")._value.get() == 1


def test_the_state_directory_keeps_its_creation_time_across_restarts(tmp_path: Path) -> None:
    metrics, registry = _restart(tmp_path, None)
    created = _value(registry, "gemmguard_state_created_timestamp_seconds")
    assert created is not None and created > 0
    _, registry = _restart(tmp_path, metrics)  # a container restart: the same pod
    assert _value(registry, "gemmguard_state_created_timestamp_seconds") == created


def test_a_new_state_directory_is_a_new_pod_and_says_so(tmp_path: Path) -> None:
    # A LeaderWorkerSet group recreation replaces the pod, same name, with an empty emptyDir:
    # the counters start over, and the creation time is what tells.
    old = tmp_path / "old"
    metrics, registry = _restart(old, None)
    metrics.canary_failures.labels("timeout").inc()
    old_created = _value(registry, "gemmguard_state_created_timestamp_seconds")
    _, registry = _restart(tmp_path / "new", None)
    assert _value(registry, "gemmguard_canary_failures_total", reason="timeout") == 0
    assert _value(registry, "gemmguard_server_restarts_total") == 0
    new_created = _value(registry, "gemmguard_state_created_timestamp_seconds")
    assert old_created is not None and new_created is not None and new_created > old_created


def test_no_state_directory_exports_no_creation_time() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    assert _value(registry, "gemmguard_state_created_timestamp_seconds") is None
