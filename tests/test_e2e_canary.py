"""End-to-end: liveness from a canary generation, against a served demo model."""

from __future__ import annotations

import concurrent.futures
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

INTERVAL, DEADLINE = 2.0, 4.0


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., Server]) -> Server:
    return server_factory("--canary-interval", str(INTERVAL), "--canary-deadline", str(DEADLINE))


def _metric(server: Server, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(server.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    return 0.0


def _engine_core(server: Server) -> psutil.Process:
    children = psutil.Process(server.process.pid).children(recursive=True)
    (core,) = [p for p in children if "EngineCore" in p.name()]
    return core


def test_live_and_canaries_run_when_idle(server: Server) -> None:
    assert server.get("/gemmguard/live").status_code == 200
    sent = server.get("/gemmguard/live").json()["canaries_sent"]
    time.sleep(INTERVAL * 2 + 1)
    assert server.get("/gemmguard/live").json()["canaries_sent"] > sent
    assert _metric(server, "gemmguard_canary_latency_seconds_count") > 0
    assert _metric(server, "gemmguard_engine_live") == 1


def test_no_canary_under_load_and_no_request_lost(server: Server) -> None:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)

    def one(i: int) -> int:
        # Streamed: every chunk is evidence, so load renews liveness while requests run.
        stream = client.completions.create(model="gemmguard-demo", prompt=f"load {i}",
                                           max_tokens=24, stream=True,
                                           extra_body={"ignore_eos": True})
        return sum(1 for chunk in stream if chunk.choices and chunk.choices[0].text != "")

    before = server.get("/gemmguard/live").json()["canaries_sent"]
    deadline = time.monotonic() + 3 * INTERVAL
    sent = answered = 0
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        while time.monotonic() < deadline:
            results = list(pool.map(one, range(4)))
            sent += len(results)
            answered += sum(1 for chunks in results if chunks > 0)
    assert sent > 0 and answered == sent  # every request answered
    assert server.get("/gemmguard/live").json()["canaries_sent"] == before


@pytest.fixture
def stopped_engine(server: Server) -> Iterator[psutil.Process]:
    core = _engine_core(server)
    os.kill(core.pid, signal.SIGSTOP)
    yield core
    os.kill(core.pid, signal.SIGCONT)


def test_a_stopped_engine_turns_live_and_ready_to_503_within_the_deadline(
    server: Server, stopped_engine: psutil.Process
) -> None:
    start = time.monotonic()
    while time.monotonic() - start < INTERVAL + DEADLINE + 10:
        live = server.get("/gemmguard/live")
        if live.status_code == 503:
            break
        time.sleep(0.5)
    assert live.status_code == 503, live.text
    assert time.monotonic() - start <= INTERVAL + DEADLINE + 3
    assert "no token within" in live.json()["reason"]
    assert server.get("/gemmguard/ready").status_code == 503
    assert server.get("/health").status_code == 200  # what vLLM's own check would still say
    assert _metric(server, "gemmguard_engine_live") == 0
    assert _metric(server, "gemmguard_canary_failures_total", reason="timeout") >= 1


def test_liveness_returns_when_the_engine_continues(server: Server) -> None:
    start = time.monotonic()
    while time.monotonic() - start < INTERVAL + DEADLINE + 15:
        if server.get("/gemmguard/live").status_code == 200:
            break
        time.sleep(0.5)
    assert server.get("/gemmguard/live").status_code == 200
    assert server.get("/gemmguard/ready").status_code == 200
