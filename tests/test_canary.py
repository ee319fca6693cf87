"""Liveness evidence: only tokens the engine generated count; a canary runs when there are none."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gemmguard.canary import ENGINE_TOKENS, CanaryConfig, Liveness
from gemmguard.endpoints import PLUGIN_NAME
from gemmguard.metrics import Metrics
from gemmguard.stat_logger import TokenStatLogger

INTERVAL = 5.0


class FakeEngine:
    """Stands in for vLLM's EngineClient: answers, hangs, or raises as told."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.errored = behaviour == "dead"
        self.aborted: list[str] = []
        self.requests = 0
        self.routed: list[int | None] = []
        self.hung: set[int] = set()  # data-parallel ranks that hang

    async def generate(self, prompt: Any, params: Any, request_id: str,
                       data_parallel_rank: int | None = None) -> AsyncIterator[str]:
        self.requests += 1
        self.routed.append(data_parallel_rank)
        if self.behaviour == "hang" or data_parallel_rank in self.hung:
            await asyncio.sleep(3600)
        if self.behaviour == "dead":
            raise RuntimeError("EngineCore encountered an issue")
        yield "token"

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def _liveness(behaviour: str, engines: tuple[int, ...] = (0,)
              ) -> tuple[Liveness, Metrics, FakeEngine]:
    engine = FakeEngine(behaviour)
    metrics = Metrics(CollectorRegistry())
    config = CanaryConfig(interval=INTERVAL, deadline=0.2)
    liveness = Liveness(engine, config, metrics, tally=ENGINE_TOKENS, engines=engines)
    return liveness, metrics, engine


def _live_metric(metrics: Metrics, engine: int = 0) -> float:
    return float(metrics.engine_live.labels(str(engine))._value.get())


def _engine_step(logger: Any, generated: int | None, engine: int = 0) -> None:
    """What vLLM's output handler hands its stat loggers after one engine step."""
    from vllm.v1.metrics.stats import IterationStats, SchedulerStats

    iteration = None
    if generated is not None:  # vLLM builds IterationStats only for a step with outputs
        iteration = IterationStats()
        iteration.num_generation_tokens = generated
    logger.record(scheduler_stats=SchedulerStats(), iteration_stats=iteration,
                  mm_cache_stats=None, engine_idx=engine)


def _vllm_adapter_of_our_logger(engines: tuple[int, ...] = (0,)) -> Any:
    """vLLM's own wrapper around a per-engine stat logger factory, as its manager builds it."""
    from vllm.v1.metrics.loggers import PerEngineStatLoggerAdapter

    return PerEngineStatLoggerAdapter(vllm_config=None, engine_indexes=list(engines),
                                      per_engine_stat_logger_factory=TokenStatLogger)


def test_vllm_loads_the_stat_logger_under_the_endpoint_plugins_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vllm.v1.metrics.loggers import load_stat_logger_plugin_factories

    monkeypatch.setenv("VLLM_PLUGINS", PLUGIN_NAME)
    assert TokenStatLogger in load_stat_logger_plugin_factories()
    monkeypatch.setenv("VLLM_PLUGINS", "none")  # plain vLLM, as the benchmarks run it
    assert TokenStatLogger not in load_stat_logger_plugin_factories()


def test_only_steps_that_generated_tokens_are_evidence() -> None:
    liveness, _, _ = _liveness("ok")
    engine = liveness.engines[0]
    logger = _vllm_adapter_of_our_logger()
    engine.last_ok = 0.0
    _engine_step(logger, None)  # an abort or a stats beat: no outputs
    _engine_step(logger, 0)  # outputs, but no new token
    liveness.observe(now=1.0)
    assert engine.last_ok == 0.0
    _engine_step(logger, 3)
    liveness.observe(now=2.0)
    assert engine.last_ok == 2.0
    liveness.observe(now=3.0)  # nothing new since the last look
    assert engine.last_ok == 2.0


def test_no_canary_while_tokens_come_out_and_one_after_an_interval_without() -> None:
    liveness, _, engine = _liveness("ok")
    logger = _vllm_adapter_of_our_logger()
    start = liveness.engines[0].last_ok
    for second in range(1, 3 * int(INTERVAL)):
        _engine_step(logger, 1)
        asyncio.run(liveness.step(start + second))
    assert engine.requests == 0 and liveness.canaries_sent == 0
    quiet_from = liveness.engines[0].last_ok
    asyncio.run(liveness.step(quiet_from + INTERVAL - 0.1))
    assert engine.requests == 0
    asyncio.run(liveness.step(quiet_from + INTERVAL))
    assert engine.requests == 1 and liveness.canaries_sent == 1 and liveness.live
    assert engine.routed == [None]  # one engine: no routing, vLLM's own choice


def test_a_hung_engine_times_out_and_the_request_is_aborted() -> None:
    liveness, metrics, engine = _liveness("hang")
    asyncio.run(liveness.engines[0].probe())
    assert not liveness.live and "within 0.2s" in liveness.reason()
    assert engine.aborted == ["gemmguard-canary-" + engine.aborted[0].rsplit("-", 1)[1]]
    assert metrics.canary_failures.labels("timeout")._value.get() == 1
    assert _live_metric(metrics) == 0


def test_tokens_from_the_engine_end_a_failure() -> None:
    liveness, metrics, _ = _liveness("hang")
    engine = liveness.engines[0]
    asyncio.run(engine.probe())
    assert not liveness.live
    liveness.observe(now=engine.last_ok + 1)  # still nothing from the engine
    assert not liveness.live
    _engine_step(_vllm_adapter_of_our_logger(), 1)  # the engine resumed and produced a token
    liveness.observe(now=engine.last_ok + 2)
    assert liveness.live and _live_metric(metrics) == 1


def test_a_dead_engine_fails_with_its_error_then_recovers() -> None:
    liveness, metrics, engine = _liveness("dead")
    asyncio.run(liveness.engines[0].probe())
    assert not liveness.live and "EngineCore encountered an issue" in liveness.reason()
    assert metrics.canary_failures.labels("engine_dead")._value.get() == 1
    engine.behaviour, engine.errored = "ok", False
    asyncio.run(liveness.engines[0].probe())
    assert liveness.live and _live_metric(metrics) == 1


def test_each_data_parallel_engine_has_its_own_evidence_and_canary() -> None:
    """A frozen engine is not hidden by the tokens of another: the server is not live, the
    reason and the metric name it, and the healthy engine stays live."""
    liveness, metrics, client = _liveness("ok", engines=(0, 1))
    client.hung = {1}
    logger = _vllm_adapter_of_our_logger(engines=(0, 1))
    start = max(e.last_ok for e in liveness.engines.values())
    for second in range(1, int(INTERVAL) + 1):
        _engine_step(logger, 4, engine=0)  # engine 0 serves its share; engine 1 is silent
        asyncio.run(liveness.step(start + second))
    assert client.routed == [1]  # a canary went to engine 1 only, routed to it
    assert not liveness.live
    assert liveness.reason().startswith("engine 1: canary got no token within 0.2s")
    assert liveness.state()["0"]["live"] and not liveness.state()["1"]["live"]
    assert (_live_metric(metrics, 0), _live_metric(metrics, 1)) == (1, 0)
    _engine_step(logger, 1, engine=1)  # engine 1 resumed
    liveness.observe(start + INTERVAL + 1)
    assert liveness.live and _live_metric(metrics, 1) == 1
