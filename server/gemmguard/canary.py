"""Liveness that means the engine still produces tokens: a tiny generation when idle.

vLLM's /health only says the API server answers; an engine core that died or hangs can leave
it at 200 for hours. The canary sends one greedy 1-token request through the engine when no
real request has finished for `interval` seconds; real requests finishing are evidence
enough (and so is every streamed chunk of a 2xx response, so long generations count while
they run), so under load nothing is sent. A canary that does not finish within `deadline`
seconds, or fails, turns liveness off until the next success.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("vllm.gemmguard")

_IDS = itertools.count()


@dataclass(frozen=True)
class CanaryConfig:
    """When and how the canary runs."""

    enabled: bool = True
    interval: float = 30.0
    deadline: float = 10.0
    prompt: str = "Hi"


class Liveness:
    """The latest evidence that the engine produces tokens, and the canary loop that renews it."""

    def __init__(self, engine_client: Any, config: CanaryConfig, metrics: Any = None) -> None:
        self.engine_client = engine_client
        self.config = config
        self.metrics = metrics
        self.last_ok = time.monotonic()  # the start-up self-check just ran through the engine
        self.failure: str | None = None
        self.canaries_sent = 0
        self._in_flight = 0
        self._task: asyncio.Task[None] | None = None

    # --- evidence from real requests ------------------------------------------------------
    def request_started(self) -> None:
        self._in_flight += 1

    def request_finished(self, ok: bool) -> None:
        self._in_flight -= 1
        if ok:
            self._succeeded()

    def request_progressed(self) -> None:
        """A real request sent output: the engine is producing tokens."""
        self._succeeded()

    # --- state ------------------------------------------------------------------------------
    @property
    def live(self) -> bool:
        return self.failure is None

    def reason(self) -> str:
        return self.failure or "ok"

    def _succeeded(self) -> None:
        self.last_ok = time.monotonic()
        if self.failure is not None:
            logger.info("gemmguard: engine live again after: %s", self.failure)
        self.failure = None
        if self.metrics is not None:
            self.metrics.engine_live.set(1)

    def _failed(self, reason: str, detail: str) -> None:
        if self.failure is None:
            logger.error("gemmguard: engine not live: %s", detail)
        self.failure = detail
        if self.metrics is not None:
            self.metrics.engine_live.set(0)
            self.metrics.canary_failures.labels(reason).inc()

    # --- the canary -------------------------------------------------------------------------
    def due(self, now: float) -> bool:
        """A canary is due when nothing has finished successfully for `interval` seconds."""
        return now - self.last_ok >= self.config.interval

    async def probe(self) -> None:
        """Send one canary and record its outcome."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0)
        request_id = f"gemmguard-canary-{next(_IDS)}"
        start = time.monotonic()
        self.canaries_sent += 1
        try:
            async with asyncio.timeout(self.config.deadline):
                async for _ in self.engine_client.generate(
                    {"prompt": self.config.prompt}, params, request_id
                ):
                    pass
        except TimeoutError:
            await self._abort(request_id)
            self._failed("timeout", f"canary got no token within {self.config.deadline:g}s "
                         "(engine hung or overloaded)")
            return
        except Exception as exc:  # engine dead, or any error the engine raises
            dead = getattr(self.engine_client, "errored", False)
            self._failed("engine_dead" if dead else "error",
                         f"canary failed: {type(exc).__name__}: {exc}")
            return
        if self.metrics is not None:
            self.metrics.canary_latency.observe(time.monotonic() - start)
        self._succeeded()

    async def _abort(self, request_id: str) -> None:
        try:
            await asyncio.wait_for(self.engine_client.abort(request_id), timeout=1)
        except Exception:  # a hung engine may not take the abort either
            pass

    async def run(self, tick: float = 1.0) -> None:
        """Check once per `tick`; send a canary when one is due and none is running."""
        while True:
            await asyncio.sleep(tick)
            if self.due(time.monotonic()):
                await self.probe()

    def start(self) -> None:
        if self.config.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())


class LivenessMiddleware:
    """ASGI middleware: /v1/ output is evidence the engine works (5xx is not).

    Each body chunk of a 2xx response counts, so a stream renews liveness token by token.
    """

    def __init__(self, app: Any, liveness_of: Any) -> None:
        self.app = app
        self.liveness_of = liveness_of

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        liveness = self.liveness_of()
        if scope["type"] != "http" or not scope["path"].startswith("/v1/") or liveness is None:
            await self.app(scope, receive, send)
            return
        status = [500]

        async def watch(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and status[0] < 300 \
                    and message.get("body"):
                liveness.request_progressed()
            await send(message)

        liveness.request_started()
        try:
            await self.app(scope, receive, watch)
        finally:
            liveness.request_finished(ok=status[0] < 500)
