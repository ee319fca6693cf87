"""gemmguard's metric families: label safety, aggregates and fallback counts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gemmguard.metrics import MAX_LABEL_CHARS, Metrics, bounded_label

WEIRD = 'model.layers.0."q\\proj"\nnext ümlaut {x="y"}'


def _row(layer: str, kernel: str = "K", turned_down=()):  # type: ignore[no-untyped-def]
    return {"layer": layer, "layer_type": "linear", "scheme": "fp8-block", "kernel": kernel,
            "rank": 0, "turned_down": list(turned_down)}


def _parse(registry: CollectorRegistry) -> dict[str, list]:  # type: ignore[type-arg]
    out: dict[str, list] = {}  # type: ignore[type-arg]
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def test_any_layer_name_round_trips_as_a_valid_label_value() -> None:
    registry = CollectorRegistry()
    Metrics(registry).publish_kernels([_row(WEIRD)])
    (sample,) = _parse(registry)["gemmguard_layer_kernel_info"]
    assert sample.labels["layer"] == bounded_label(WEIRD)
    assert "\n" not in sample.labels["layer"]


def test_long_reasons_are_bounded_and_keep_their_start() -> None:
    reason = "requires AMX tile support " * 40
    registry = CollectorRegistry()
    Metrics(registry).publish_kernels(
        [_row("a", turned_down=[{"kernel": "X", "reason": reason, "accepted": False}])]
    )
    (sample,) = _parse(registry)["gemmguard_kernel_fallback_total"]
    assert len(sample.labels["reason"]) == MAX_LABEL_CHARS
    assert sample.labels["reason"].startswith("requires AMX tile support requires")
    assert sample.labels["reason"].endswith("…")


def test_aggregates_and_fallbacks_count_layers() -> None:
    registry = CollectorRegistry()
    down = [{"kernel": "First", "reason": "denied", "accepted": False}]
    Metrics(registry).publish_kernels(
        [_row("a", "K1", down), _row("b", "K1", down), _row("c", "K2")]
    )
    samples = _parse(registry)
    counts = {s.labels["kernel"]: s.value for s in samples["gemmguard_kernel_layers"]}
    assert counts == {"K1": 2, "K2": 1}
    (fallback,) = samples["gemmguard_kernel_fallback_total"]
    assert fallback.value == 2
    assert fallback.labels == {"layer_type": "linear", "scheme": "fp8-block",
                               "preferred": "First", "chosen": "K1", "reason": "denied"}


def test_per_layer_series_can_be_switched_off_and_aggregates_stay() -> None:
    registry = CollectorRegistry()
    Metrics(registry).publish_kernels([_row("a"), _row("b")], per_layer=False)
    samples = _parse(registry)
    assert "gemmguard_layer_kernel_info" not in samples
    assert samples["gemmguard_kernel_layers"][0].value == 2


def test_only_the_first_api_server_counts_fallbacks() -> None:
    registry = CollectorRegistry()
    down = [{"kernel": "First", "reason": "r", "accepted": False}]
    Metrics(registry).publish_kernels([_row("a", "K", down)], count_fallbacks=False)
    assert "gemmguard_kernel_fallback_total" not in _parse(registry)


def test_build_info_says_how_vllm_was_verified_and_each_hook_that_did_not_attach() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    info = {"version": "0.1.0", "vllm_version": "0.35.0", "vllm_verified": "none",
            "torch_version": "2.13.0", "platform": "cuda", "device": "H100"}
    metrics.publish_build([
        {**info, "rank": 0, "hooks_missing": "kernel-selection-capture:moe,selfcheck-at-load"},
        {**info, "rank": 1, "hooks_missing": ""}])
    assert registry.get_sample_value("gemmguard_build_info", {
        **info, "rank": "0"}) == 1
    missing = {(s.labels["hook"], s.labels["rank"]) for f in registry.collect()
               if f.name == "gemmguard_hook_missing" for s in f.samples}
    assert missing == {("kernel-selection-capture:moe", "0"), ("selfcheck-at-load", "0")}
