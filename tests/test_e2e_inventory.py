"""End-to-end: the kernel inventory of a served fp8-block demo model, on /metrics and the route."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Server
from gemmguard.metrics import bounded_label

pytestmark = pytest.mark.e2e

HELPERS = Path(__file__).parent / "helpers"


def _samples(server: Server, name: str) -> list:  # type: ignore[type-arg]
    families = text_string_to_metric_families(server.get("/metrics").text)
    return [s for f in families for s in f.samples if s.name == name]


def _layers(server: Server) -> list[dict]:  # type: ignore[type-arg]
    body = server.get("/gemmguard/v1/kernels").json()
    return [row for rank in body["ranks"] for row in rank["layers"]]


@pytest.fixture(scope="module")
def server(shared_server: Callable[..., Server]) -> Server:
    return shared_server("--demo-scheme", "fp8-block")


@pytest.fixture(scope="module")
def first_choice(server: Server) -> str:
    """The kernel the default server chose for its FP8 layers (read, not assumed)."""
    kernels = {row["kernel"] for row in _layers(server) if row["scheme"] == "fp8-block"}
    assert len(kernels) == 1
    return kernels.pop()


@pytest.fixture(scope="module")
def denied_server(shared_server: Callable[..., Server], first_choice: str) -> Server:
    return shared_server("--demo-scheme", "fp8-block", "--deny-kernel", first_choice)


def test_every_gemm_layer_is_reported(server: Server) -> None:
    names = {row["layer"] for row in _layers(server)}
    for layer in range(2):  # the demo has 2 decoder layers
        for proj in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                     "mlp.down_proj", "self_attn.attn"):
            assert f"model.layers.{layer}.{proj}" in names
    assert "lm_head" in names
    types = {row["layer"]: row["layer_type"] for row in _layers(server)}
    assert types["lm_head"] == "lm_head"
    assert types["model.layers.0.self_attn.attn"] == "attention"
    assert types["model.layers.0.mlp.down_proj"] == "linear"


def test_route_and_metrics_match_the_live_model(server: Server) -> None:
    model = server.get("/gemmguard/v1/build").json()  # the route the server answers
    assert model["ranks"]
    result = subprocess.run(
        [sys.executable, str(HELPERS / "read_live_kernels.py"), _model_path(server)],
        capture_output=True, text=True, timeout=600,
    )
    live_line = [line for line in result.stdout.splitlines() if line.startswith("LIVE=")]
    assert live_line, result.stderr[-4000:]
    live = json.loads(live_line[0][len("LIVE="):])
    assert live  # the FP8 layers hold a kernel object
    route = {row["layer"]: row["kernel"] for row in _layers(server)}
    metric = {s.labels["layer"]: s.labels["kernel"]
              for s in _samples(server, "gemmguard_layer_kernel_info")}
    for layer, kernel in live.items():
        assert route[layer] == kernel
        assert metric[layer] == kernel
    assert set(metric) == set(route)


def _model_path(server: Server) -> str:
    models = server.get("/v1/models").json()["data"]
    return str(models[0]["root"])


def test_aggregates_count_every_layer(server: Server) -> None:
    per_kernel = _samples(server, "gemmguard_kernel_layers")
    assert sum(s.value for s in per_kernel) == len(_layers(server))


def test_vllms_own_reason_reaches_the_fallback_label(server: Server) -> None:
    from vllm.model_executor.kernels.linear import _POSSIBLE_FP8_BLOCK_KERNELS
    from vllm.platforms import PlatformEnum

    first = _POSSIBLE_FP8_BLOCK_KERNELS[PlatformEnum.CPU][0]
    supported, reason = first.is_supported()
    if supported:
        pytest.fail(f"{first.__name__} works on this CPU; this test needs a CPU it rejects")
    fallbacks = [s for s in _samples(server, "gemmguard_kernel_fallback_total")
                 if s.labels["preferred"] == first.__name__]
    assert fallbacks, "the turned-down first candidate is not counted"
    for sample in fallbacks:
        assert reason is not None and reason.rstrip(".") in sample.labels["reason"]
        assert sample.labels["reason"] == bounded_label(sample.labels["reason"])
        assert sample.labels["chosen"] != first.__name__
    fp8_layers = [row for row in _layers(server) if row["scheme"] == "fp8-block"]
    assert sum(s.value for s in fallbacks) == len(fp8_layers)


def test_deny_kernel_changes_the_kernel_and_counts_a_denied_fallback(
    denied_server: Server, first_choice: str
) -> None:
    chosen = {row["kernel"] for row in _layers(denied_server) if row["scheme"] == "fp8-block"}
    assert chosen and first_choice not in chosen
    denied = [s for s in _samples(denied_server, "gemmguard_kernel_fallback_total")
              if s.labels["reason"] == "denied"]
    assert denied
    assert {s.labels["preferred"] for s in denied} == {first_choice}
    assert {s.labels["chosen"] for s in denied} == chosen
    client = openai.OpenAI(base_url=denied_server.base_url + "/v1", api_key="x", max_retries=0)
    reply = client.completions.create(model="gemmguard-demo", prompt="hi", max_tokens=4,
                                      extra_body={"ignore_eos": True})
    assert reply.usage is not None and reply.usage.completion_tokens == 4


def test_several_api_servers_export_each_series_once(
    server_factory: Callable[..., Server], server: Server
) -> None:
    # vLLM switches /metrics to its Prometheus multiprocess mode with more than one API server.
    multi = server_factory("--demo-scheme", "fp8-block", "--api-server-count", "2")
    layers = _samples(multi, "gemmguard_layer_kernel_info")
    assert len(layers) == len({s.labels["layer"] for s in layers}) == len(_layers(multi))
    single = {tuple(sorted(s.labels.items())): s.value
              for s in _samples(server, "gemmguard_kernel_fallback_total")}
    several = {tuple(sorted(s.labels.items())): s.value
               for s in _samples(multi, "gemmguard_kernel_fallback_total")}
    assert several == single  # counted once, not once per API server
