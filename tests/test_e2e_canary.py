"""End-to-end: liveness from the engine's tokens (a canary when idle), on a served demo model."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import openai
import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import Server

pytestmark = pytest.mark.e2e

INTERVAL, DEADLINE = 3.0, 4.0
MODEL = "gemmguard-demo"


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., Server]) -> Server:
    return server_factory("--canary-interval", str(INTERVAL), "--canary-deadline", str(DEADLINE))


def _metric(server: Server, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(server.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    return 0.0


def _canaries(server: Server) -> int:
    return int(server.get("/gemmguard/live").json()["canaries_sent"])


def _engine_core(server: Server) -> psutil.Process:
    children = psutil.Process(server.process.pid).children(recursive=True)
    (core,) = [p for p in children if "EngineCore" in p.name()]
    return core


def test_live_and_canaries_run_when_idle(server: Server) -> None:
    assert server.get("/gemmguard/live").status_code == 200
    sent = _canaries(server)
    time.sleep(INTERVAL * 2 + 1)
    assert _canaries(server) > sent
    assert _metric(server, "gemmguard_canary_latency_seconds_count") > 0
    assert _metric(server, "gemmguard_engine_live") == 1
    log = server.log()
    assert "gemmguard_api -> gemmguard.stat_logger:TokenStatLogger" in log  # vLLM found it
    assert "no gemmguard stat logger" not in log  # and built it in the API server


def test_no_canary_while_long_unstreamed_requests_generate(server: Server) -> None:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    stop = threading.Event()

    def worker(i: int) -> list[int]:
        # Not streamed: the API server sends nothing until the end; only the engine's tokens
        # tell liveness that work is going on.
        done = []
        while not stop.is_set():
            reply = client.completions.create(model=MODEL, prompt=f"load {i}", max_tokens=300,
                                              extra_body={"ignore_eos": True})
            assert reply.usage is not None
            done.append(reply.usage.completion_tokens)
        return done

    tokens_before = _metric(server, "vllm:generation_tokens_total")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(worker, i) for i in range(3)]
        time.sleep(INTERVAL)  # load under way: an idle canary sent before it is not counted
        before = _canaries(server)
        time.sleep(3 * INTERVAL)
        during = _canaries(server)
        stop.set()
        finished = [n for future in futures for n in future.result()]
    assert finished and set(finished) == {300}  # every request answered in full
    assert during == before
    # vLLM's own Prometheus stat logger still runs beside gemmguard's.
    assert _metric(server, "vllm:generation_tokens_total") >= tokens_before + sum(finished)


@pytest.fixture
def stopped_engine(server: Server) -> Iterator[psutil.Process]:
    core = _engine_core(server)
    os.kill(core.pid, signal.SIGSTOP)
    yield core
    os.kill(core.pid, signal.SIGCONT)


def _requests_without_tokens(server: Server) -> list[int]:
    """Everything a client or gateway may send that the API server answers without the engine."""
    statuses = [
        server.get("/v1/models").status_code,
        server.get("/health").status_code,
        server.post("/v1/completions", json={"model": "no-such-model", "prompt": "x"}).status_code,
        server.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": -1})
        .status_code,
    ]
    try:  # reaches the frozen engine, then the client gives up: aborted before any token
        requests.post(server.base_url + "/v1/completions", timeout=0.5,
                      json={"model": MODEL, "prompt": "x", "max_tokens": 4})
    except requests.Timeout:
        statuses.append(0)
    return statuses


def test_a_stopped_engine_turns_live_and_ready_to_503_and_requests_do_not_revive_it(
    server: Server, stopped_engine: psutil.Process
) -> None:
    start = time.monotonic()
    while time.monotonic() - start < INTERVAL + DEADLINE + 10:
        live = server.get("/gemmguard/live")
        if live.status_code == 503:
            break
        time.sleep(0.5)
    assert live.status_code == 503, live.text
    # The canary loop looks once a second: allow that, and a little for this 2-core box.
    assert time.monotonic() - start <= INTERVAL + DEADLINE + 3
    assert "no token within" in live.json()["reason"]
    assert server.get("/gemmguard/ready").status_code == 503
    assert _metric(server, "gemmguard_engine_live") == 0
    assert _metric(server, "gemmguard_canary_failures_total", reason="timeout") >= 1
    # Answers from the API server alone prove nothing about the engine, however many there are.
    seen = []
    hammer_until = time.monotonic() + 2 * INTERVAL
    while time.monotonic() < hammer_until:
        assert _requests_without_tokens(server) == [200, 200, 404, 400, 0]
        seen.append(server.get("/gemmguard/live").status_code)
    assert seen and set(seen) == {503}


def test_liveness_returns_when_the_engine_continues(server: Server) -> None:
    start = time.monotonic()
    while time.monotonic() - start < INTERVAL + DEADLINE + 15:
        if server.get("/gemmguard/live").status_code == 200:
            break
        time.sleep(0.5)
    assert server.get("/gemmguard/live").status_code == 200
    assert server.get("/gemmguard/ready").status_code == 200
    assert _metric(server, "gemmguard_engine_live") == 1
