"""End-to-end: the self-check of MoE experts and of a 4-bit checkpoint, on served demo models.

Four engine starts: the Qwen3-MoE bf16 demo as it is, the same with faulty experts under
`warn` (serves, says degraded) and under the default policy in compiled mode (the experts are
replaced in place by vLLM's next oracle choice, and it serves), and the dense W4A8-int8 demo.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import FAST_ENGINE_ARGS, Server
from gemmguard.demo import write_demo_model
from gemmguard.kernels import faulty_moe
from gemmguard.selfcheck.measure import DEGRADED_EXCESS_BITS as DEGRADED
from gemmguard.selfcheck.sample import MOE_EXPERTS

pytestmark = pytest.mark.e2e

NAME = "moe-demo"
MOE_LAYERS = ("model.layers.0.mlp.experts.routed_experts",
              "model.layers.1.mlp.experts.routed_experts")
CORRUPT = "CorruptExpertCPUExperts"
COMPILED_ENGINE_ARGS = tuple(arg for arg in FAST_ENGINE_ARGS if arg != "--enforce-eager")


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("moe") / "bf16", "bf16", arch="qwen3-moe")


# Each server serves one test and stops after it: the 2-core box holds one engine of ours at once.
@pytest.fixture
def healthy(server_factory: Callable[..., Server], moe_model: Path) -> Iterator[Server]:
    server = server_factory(str(moe_model), "--served-model-name", NAME)
    yield server
    server.stop()


@pytest.fixture
def warned(server_factory: Callable[..., Server], moe_model: Path) -> Iterator[Server]:
    server = server_factory(str(moe_model), "--served-model-name", NAME, "--selfcheck-policy",
                            "warn", env={"GEMMGUARD_TEST_KERNELS": "moe-e8m0"})
    yield server
    server.stop()


def _layers(server: Server) -> list[dict]:  # type: ignore[type-arg]
    return server.get("/gemmguard/v1/selfcheck").json()["ranks"][0]["layers"]  # type: ignore[no-any-return]


def _moe_rows(server: Server) -> list[dict]:  # type: ignore[type-arg]
    return [row for row in _layers(server) if row["layer_type"] == "moe"]


def _metric(server: Server, name: str, **labels: str) -> float:
    families = text_string_to_metric_families(server.get("/metrics").text)
    (sample,) = [s for f in families for s in f.samples
                 if s.name == name and labels.items() <= s.labels.items()]
    return float(sample.value)


def _smallest_expert(model: Path, layer: int) -> int:
    """The expert of a demo MoE layer with the smallest gate/up weights, from the checkpoint."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(model / "model.safetensors"))
    prefix = f"model.layers.{layer}.mlp.experts"
    count = len({k for k in tensors if k.startswith(prefix) and k.endswith("gate_proj.weight")})
    w13 = torch.stack([torch.cat([tensors[f"{prefix}.{e}.gate_proj.weight"],
                                  tensors[f"{prefix}.{e}.up_proj.weight"]])
                       for e in range(count)])
    return faulty_moe.smallest_expert(w13)


def _chat(server: Server, model: str = NAME) -> str | None:
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0) as client:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4,
            extra_body={"ignore_eos": True})
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    return reply.choices[0].message.content


def test_moe_demo_checks_every_moe_layer_per_expert_and_serves(healthy: Server) -> None:
    assert healthy.get("/gemmguard/ready").json() == {
        "ready": True, "selfcheck_passed": True, "selfcheck_complete": True}
    report = healthy.get("/gemmguard/v1/selfcheck").json()
    assert report["passed"] is True and report["complete"] is True
    rows = _moe_rows(healthy)
    assert [row["layer"] for row in rows] == list(MOE_LAYERS)
    for row in rows:
        assert row["verdict"] == "pass" and row["kernel"] == "CPUUnquantizedExperts"
        assert row["scheme"] == "unquantized-bf16"
        assert row["excess_bits"] is not None and row["excess_bits"] < DEGRADED
        assert len(row["experts"]) == MOE_EXPERTS
        for expert in row["experts"]:
            assert expert["verdict"] == "pass" and expert["bits"] > 5
    kernels = healthy.get("/gemmguard/v1/kernels").json()["ranks"][0]["layers"]
    moe_kernels = [r for r in kernels if r["layer_type"] == "moe"]
    assert [r["kernel"] for r in moe_kernels] == ["CPUUnquantizedExperts"] * len(MOE_LAYERS)
    # vLLM's CPU oracle asks the ISA-specific experts first; this CPU's vLLM turned them down.
    for row in moe_kernels:
        assert row["preferred"] == "X86CPUUnquantizedExperts", row
        assert [t["kernel"] for t in row["turned_down"]] == [
            "X86CPUUnquantizedExperts", "ArmCPUUnquantizedExperts",
            "PowerCPUUnquantizedExperts"], row
        for turned in row["turned_down"]:
            assert turned["accepted"] is False, row
            assert turned["reason"].startswith("kernel does not support"), row
    assert _metric(healthy, "gemmguard_selfcheck_layers", result="unchecked") == 0
    assert _chat(healthy) is not None


def test_faulty_experts_under_warn_serve_degraded_and_say_so(warned: Server) -> None:
    ready = warned.get("/gemmguard/ready")
    assert ready.status_code == 200 and ready.json()["selfcheck_passed"] is False
    rows = _moe_rows(warned)
    assert [row["kernel"] for row in rows] == ["E8M0RequantCPUExperts"] * len(MOE_LAYERS)
    assert {row["verdict"] for row in rows} == {"degraded"}
    assert all(row["excess_bits"] > DEGRADED for row in rows)
    # Experts given enough tokens read degraded themselves; the layer's verdict covers the rest.
    judged = [e for row in rows for e in row["experts"] if e["excess_judged"]]
    assert judged and all(e["verdict"] == "degraded" for e in judged)
    assert all(e["excess_bits"] > DEGRADED for row in rows for e in row["experts"])
    # The dense layers keep their honest kernels and pass.
    assert {row["verdict"] for row in _layers(warned) if row["layer_type"] != "moe"} == {"pass"}
    assert _metric(warned, "gemmguard_selfcheck_passed") == 0
    assert _metric(warned, "gemmguard_selfcheck_layers", result="degraded") == len(MOE_LAYERS)
    assert "E8M0RequantCPUExperts" in warned.log() and "degraded" in warned.log()
    _chat(warned)


@pytest.fixture
def cured(server_factory: Callable[..., Server], moe_model: Path) -> Iterator[Server]:
    # Default policy (fallback), compiled mode: the corrupting experts are replaced by vLLM's
    # next oracle choice inside the one engine start, before torch.compile traces the model.
    server = server_factory(str(moe_model), "--served-model-name", NAME, *COMPILED_ENGINE_ARGS,
                            env={"GEMMGUARD_TEST_KERNELS": "moe-corrupt-expert"}, fast=False)
    yield server
    server.stop()


def test_a_corrupted_expert_is_replaced_in_place_and_served_in_compiled_mode(
    cured: Server, moe_model: Path
) -> None:
    log = cured.log()
    assert "enforce_eager=False" in log and "Warming up model for the compilation" in log
    assert len(set(re.findall(r"EngineCore(?:_DP\d+)? pid=(\d+)", log))) == 1
    report = cured.get("/gemmguard/v1/selfcheck").json()
    assert report["passed"] is True and report["complete"] is True
    replaced = {item["layer"]: item for item in report["replacements"]}
    assert set(replaced) == set(MOE_LAYERS)
    for index, layer in enumerate(MOE_LAYERS):
        item = replaced[layer]
        assert (item["rejected"], item["rejected_verdict"]) == (CORRUPT, "broken")
        assert item["kernel"] and item["kernel"] != CORRUPT and item["cost_ratio"] > 0
        # The faulty kernel corrupts each layer's smallest expert; the report names it.
        assert [e["expert"] for e in item["rejected_experts"]] == [
            _smallest_expert(moe_model, index)]
    moe_rows = _moe_rows(cured)
    assert {row["verdict"] for row in moe_rows} == {"pass"}
    assert {row["kernel"] for row in moe_rows} == {item["kernel"] for item in replaced.values()}
    kernels = cured.get("/gemmguard/v1/kernels").json()["ranks"][0]["layers"]
    assert CORRUPT not in {row["kernel"] for row in kernels if row["layer_type"] == "moe"}
    assert _metric(cured, "gemmguard_selfcheck_passed") == 1
    assert _metric(cured, "gemmguard_selfcheck_rejected_layers", kernel=CORRUPT,
                   result="broken") == len(MOE_LAYERS)
    assert _metric(cured, "gemmguard_selfcheck_replacement_cost_ratio", rejected=CORRUPT) > 0
    assert _metric(cured, "gemmguard_kernel_fallback_total", layer_type="moe",
                   preferred=CORRUPT, reason="selfcheck") == len(MOE_LAYERS)
    # The kernel the layers run is never also counted as turned down for them.
    fallbacks = [s for f in text_string_to_metric_families(cured.get("/metrics").text)
                 for s in f.samples if s.name == "gemmguard_kernel_fallback_total"]
    assert not [s for s in fallbacks if s.labels["preferred"] == s.labels["chosen"]]
    assert "experts replaced by" in log
    _chat(cured)


@pytest.fixture
def four_bit(server_factory: Callable[..., Server],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model = write_demo_model(tmp_path_factory.mktemp("w4a8") / "w4a8-int8", "w4a8-int8-g128")
    server = server_factory(str(model), "--served-model-name", "w4a8-demo")
    yield server
    server.stop()


def test_a_4_bit_demo_is_checked_layer_by_layer_and_serves(four_bit: Server) -> None:
    report = four_bit.get("/gemmguard/v1/selfcheck").json()
    assert report["passed"] is True and report["complete"] is True
    layers = report["ranks"][0]["layers"]
    four_bit_rows = [row for row in layers if row["scheme"] == "w4a8-int8-g128"]
    # 2 decoder layers × (qkv, o, gate_up, down); lm_head stays bf16.
    assert len(four_bit_rows) == 8
    assert {row["verdict"] for row in layers} == {"pass"}
    assert all(row["bits"] is not None for row in four_bit_rows)
    _chat(four_bit, "w4a8-demo")
