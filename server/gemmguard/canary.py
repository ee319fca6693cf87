"""Liveness that means the engine still produces tokens: evidence from the engine's own output.

vLLM's /health only says the API server answers; an engine core that died or hangs can leave it
at 200 for hours, and any HTTP answer (a model list, a 4xx) can come from the API server alone.
So the only evidence taken here is tokens the engine generated: vLLM's output handler gives each
batch of engine outputs to its stat loggers, and gemmguard's (`gemmguard.stat_logger`) adds the
batch's new tokens to this process's `ENGINE_TOKENS`. Once per tick the canary loop looks at
that tally; if it grew, the engine is live. When it has not grown for `interval` seconds, one
greedy 1-token request is sent. A canary that does not finish within `deadline` seconds, or
fails, turns liveness off until the engine produces tokens again. Nothing here runs per request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

from gemmguard import vllm_adapter

logger = logging.getLogger("vllm.gemmguard")

_IDS = itertools.count()


@dataclass(frozen=True)
class CanaryConfig:
    """When and how the canary runs."""

    enabled: bool = True
    interval: float = 30.0
    deadline: float = 10.0
    prompt: str = "Hi"


class TokenTally:
    """Tokens the engine generated for this API server process, counted once per engine step."""

    __slots__ = ("tokens", "loggers")

    def __init__(self) -> None:
        self.tokens = 0
        # gemmguard stat loggers vLLM built in this process: 0 means no evidence will come.
        self.loggers = 0


# One per process: vLLM builds the stat logger, gemmguard's endpoint plugin reads it.
ENGINE_TOKENS = TokenTally()


class Liveness:
    """The latest evidence that the engine produces tokens, and the canary loop that renews it."""

    def __init__(
        self,
        engine_client: Any,
        config: CanaryConfig,
        metrics: Any = None,
        tally: TokenTally = ENGINE_TOKENS,
    ) -> None:
        self.engine_client = engine_client
        self.config = config
        self.metrics = metrics
        self.tally = tally
        self._tokens_seen = tally.tokens
        self.last_ok = time.monotonic()  # the start-up self-check just ran through the engine
        self.failure: str | None = None
        self.canaries_sent = 0
        self._task: asyncio.Task[None] | None = None

    # --- state ------------------------------------------------------------------------------
    @property
    def live(self) -> bool:
        return self.failure is None

    def reason(self) -> str:
        return self.failure or "ok"

    def observe(self, now: float) -> None:
        """Renew liveness if the engine generated tokens since the last look."""
        tokens = self.tally.tokens
        if tokens != self._tokens_seen:
            self._tokens_seen = tokens
            self._succeeded(now)

    def _succeeded(self, now: float) -> None:
        self.last_ok = now
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
        """A canary is due when the engine has generated nothing for `interval` seconds."""
        return now - self.last_ok >= self.config.interval

    async def probe(self) -> None:
        """Send one canary and record its outcome."""
        params = vllm_adapter.greedy_params(1)
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
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.canary_latency.observe(now - start)
        self._succeeded(now)

    async def _abort(self, request_id: str) -> None:
        try:
            await asyncio.wait_for(self.engine_client.abort(request_id), timeout=1)
        except Exception:  # a hung engine may not take the abort either
            pass

    async def step(self, now: float) -> None:
        """Take the engine's new tokens as evidence; without any for `interval`, send a canary."""
        self.observe(now)
        if self.due(now):
            await self.probe()

    async def run(self, tick: float = 1.0) -> None:
        """One step per `tick`, for as long as the server runs."""
        while True:
            await asyncio.sleep(tick)
            await self.step(time.monotonic())

    def start(self) -> None:
        if not self.config.enabled or self._task is not None:
            return
        if self.tally.loggers == 0:
            logger.warning(
                "gemmguard: vLLM built no gemmguard stat logger in this API server, so the "
                "engine's tokens are not seen and a canary is sent every %gs even under load. Name "
                "'gemmguard_api' in VLLM_PLUGINS (`gemmguard serve` does) and check that "
                "`pip show gemmguard` lists its vllm.stat_logger_plugins entry point.",
                self.config.interval,
            )
        self._task = asyncio.get_running_loop().create_task(self.run())
