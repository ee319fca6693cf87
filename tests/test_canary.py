"""The canary's decisions: when it is due, what counts as evidence, and how it fails."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry

from gemmguard.canary import CanaryConfig, Liveness
from gemmguard.metrics import Metrics


class FakeEngine:
    """Stands in for vLLM's EngineClient: answers, hangs, or raises as told."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.errored = behaviour == "dead"
        self.aborted: list[str] = []

    async def generate(self, prompt: Any, params: Any, request_id: str) -> AsyncIterator[str]:
        if self.behaviour == "hang":
            await asyncio.sleep(3600)
        if self.behaviour == "dead":
            raise RuntimeError("EngineCore encountered an issue")
        yield "token"

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def _liveness(behaviour: str) -> tuple[Liveness, Metrics, FakeEngine]:
    engine = FakeEngine(behaviour)
    metrics = Metrics(CollectorRegistry())
    return Liveness(engine, CanaryConfig(interval=5, deadline=0.2), metrics), metrics, engine


def test_due_only_after_the_interval_without_a_finished_request() -> None:
    liveness, _, _ = _liveness("ok")
    now = liveness.last_ok
    assert not liveness.due(now + 4.9)
    assert liveness.due(now + 5.0)
    liveness.request_started()
    liveness.request_finished(ok=True)  # real work is evidence: the clock restarts
    assert not liveness.due(now + 5.0)


def test_server_errors_are_not_evidence() -> None:
    liveness, _, _ = _liveness("ok")
    before = liveness.last_ok
    liveness.request_started()
    liveness.request_finished(ok=False)
    assert liveness.last_ok == before


def test_a_hung_engine_times_out_and_the_request_is_aborted() -> None:
    liveness, metrics, engine = _liveness("hang")
    asyncio.run(liveness.probe())
    assert not liveness.live and "within 0.2s" in liveness.reason()
    assert engine.aborted == ["gemmguard-canary-" + engine.aborted[0].rsplit("-", 1)[1]]
    assert metrics.canary_failures.labels("timeout")._value.get() == 1
    assert metrics.engine_live._value.get() == 0


def test_a_dead_engine_fails_with_its_error_then_recovers() -> None:
    liveness, metrics, engine = _liveness("dead")
    asyncio.run(liveness.probe())
    assert not liveness.live and "EngineCore encountered an issue" in liveness.reason()
    assert metrics.canary_failures.labels("engine_dead")._value.get() == 1
    engine.behaviour, engine.errored = "ok", False
    asyncio.run(liveness.probe())
    assert liveness.live and metrics.engine_live._value.get() == 1


def test_middleware_counts_streamed_chunks_and_not_server_errors() -> None:
    from gemmguard.canary import LivenessMiddleware

    liveness, _, _ = _liveness("ok")

    def app_with(status: int):  # type: ignore[no-untyped-def]
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": status})
            for chunk in (b"data: a\n\n", b"data: b\n\n", b""):
                await send({"type": "http.response.body", "body": chunk, "more_body": bool(chunk)})
        return app

    async def drive(status: int) -> list[float]:
        seen: list[float] = []

        async def send(message: Any) -> None:
            seen.append(liveness.last_ok)

        middleware = LivenessMiddleware(app_with(status), lambda: liveness)
        await middleware({"type": "http", "path": "/v1/completions"}, None, send)
        return seen

    liveness.last_ok = 0.0
    assert asyncio.run(drive(500))[-1] == 0.0  # a 5xx stream is no evidence
    seen = asyncio.run(drive(200))
    assert seen[1] > 0.0  # renewed at the first chunk, before the request finished
