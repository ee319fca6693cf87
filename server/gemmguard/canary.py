"""Liveness that means the engine still produces tokens: evidence from the engine's own output.

vLLM's /health only says the API server answers; an engine core that died or hangs can leave it
at 200 for hours, and any HTTP answer (a model list, a 4xx) can come from the API server alone.
So the only evidence taken here is tokens the engine generated: vLLM's output handler gives each
batch of engine outputs to its stat loggers (one per engine), and gemmguard's
(`gemmguard.stat_logger`) adds the batch's new tokens to this process's `ENGINE_TOKENS`, by engine.
Once per tick the canary loop looks at each engine's tally; if it grew, that engine is live. When
it has not grown for `interval` seconds, one greedy 1-token request is sent to that engine. A
canary that does not finish within `deadline` seconds, or fails, turns the engine's liveness off
until it produces tokens again; the server is live only while every engine is. Nothing here runs
per request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Iterable
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
    """Tokens each engine generated for this API server process, counted once per engine step."""

    __slots__ = ("tokens", "loggers")

    def __init__(self) -> None:
        self.tokens: dict[int, int] = {}  # by engine index (the data-parallel rank)
        # gemmguard stat loggers vLLM built in this process: 0 means no evidence will come.
        self.loggers = 0

    def add(self, engine: int, tokens: int) -> None:
        self.tokens[engine] = self.tokens.get(engine, 0) + tokens


# One per process: vLLM builds the stat loggers (one per engine), gemmguard's endpoint plugin
# reads them.
ENGINE_TOKENS = TokenTally()


class EngineLiveness:
    """One engine's latest evidence that it produces tokens, and its canary.

    With data parallelism every engine answers for its own share of requests: a hung engine
    must not be hidden by the tokens of another, so each has its own evidence and its own
    canary, sent to it by vLLM's data-parallel rank routing (`routed`).
    """

    def __init__(self, engine: int, *, client: Any, config: CanaryConfig, tally: TokenTally,
                 metrics: Any = None, routed: bool = False) -> None:
        self.engine, self.client, self.config = engine, client, config
        self.tally, self.metrics, self.routed = tally, metrics, routed
        self._tokens_seen = tally.tokens.get(engine, 0)
        self.last_ok = time.monotonic()  # the start-up self-check just ran through the engine
        self.failure: str | None = None
        self.canaries_sent = 0
        self._publish()

    @property
    def live(self) -> bool:
        return self.failure is None

    def _publish(self, failed: str = "") -> None:
        if self.metrics is None:
            return
        self.metrics.engine_live.labels(str(self.engine)).set(1 if self.live else 0)
        if failed:
            self.metrics.canary_failures.labels(failed).inc()

    def observe(self, now: float) -> None:
        """Renew liveness if the engine generated tokens since the last look."""
        tokens = self.tally.tokens.get(self.engine, 0)
        if tokens != self._tokens_seen:
            self._tokens_seen = tokens
            self._succeeded(now)

    def _succeeded(self, now: float) -> None:
        self.last_ok = now
        if self.failure is not None:
            logger.info("gemmguard: engine %d live again after: %s", self.engine, self.failure)
            self.failure = None
        self._publish()

    def _failed(self, reason: str, detail: str) -> None:
        if self.failure is None:
            logger.error("gemmguard: engine %d not live: %s", self.engine, detail)
        self.failure = detail
        self._publish(failed=reason)

    def due(self, now: float) -> bool:
        """A canary is due when the engine has generated nothing for `interval` seconds."""
        return now - self.last_ok >= self.config.interval

    async def probe(self) -> None:
        """Send one canary to this engine and record its outcome."""
        params = vllm_adapter.greedy_params(1)
        request_id = f"gemmguard-canary-{next(_IDS)}"
        route = {"data_parallel_rank": self.engine} if self.routed else {}
        start = time.monotonic()
        self.canaries_sent += 1
        try:
            async with asyncio.timeout(self.config.deadline):
                async for _ in self.client.generate({"prompt": self.config.prompt}, params,
                                                    request_id, **route):
                    pass
        except TimeoutError:
            await self._abort(request_id)
            self._failed("timeout", f"canary got no token within {self.config.deadline:g}s "
                         "(engine hung or overloaded)")
            return
        except Exception as exc:  # engine dead, or any error the engine raises
            dead = getattr(self.client, "errored", False)
            self._failed("engine_dead" if dead else "error",
                         f"canary failed: {type(exc).__name__}: {exc}")
            return
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.canary_latency.observe(now - start)
        self._succeeded(now)

    async def _abort(self, request_id: str) -> None:
        try:
            await asyncio.wait_for(self.client.abort(request_id), timeout=1)
        except Exception:  # a hung engine may not take the abort either
            pass


class Liveness:
    """Every engine's liveness, and the canary loop that renews it."""

    def __init__(
        self,
        engine_client: Any,
        config: CanaryConfig,
        metrics: Any = None,
        tally: TokenTally = ENGINE_TOKENS,
        engines: Iterable[int] = (0,),
    ) -> None:
        self.engine_client = engine_client
        self.config = config
        self.metrics = metrics
        self.tally = tally
        ranks = sorted(set(engines))
        # A canary is routed to its engine only where there are several (one takes all).
        self.engines = {e: EngineLiveness(e, client=engine_client, config=config, tally=tally,
                                          metrics=metrics, routed=len(ranks) > 1)
                        for e in ranks}
        self._task: asyncio.Task[None] | None = None

    # --- state ------------------------------------------------------------------------------
    @property
    def live(self) -> bool:
        """Live only while every engine is: a hung engine hangs its share of the requests."""
        return all(engine.live for engine in self.engines.values())

    def reason(self) -> str:
        failing = [f"engine {e.engine}: {e.failure}" for e in self.engines.values() if not e.live]
        return "; ".join(failing) or "ok"

    @property
    def canaries_sent(self) -> int:
        return sum(engine.canaries_sent for engine in self.engines.values())

    def state(self) -> dict[str, dict[str, Any]]:
        """Each engine's liveness, for /gemmguard/live."""
        return {str(e.engine): {"live": e.live, "reason": e.failure or "ok",
                                "canaries_sent": e.canaries_sent}
                for e in self.engines.values()}

    def observe(self, now: float) -> None:
        for engine in self.engines.values():
            engine.observe(now)

    async def step(self, now: float) -> None:
        """Take each engine's new tokens as evidence; to every engine without any for
        `interval`, send a canary (at once: one hung engine must not delay the others')."""
        self.observe(now)
        due = [engine.probe() for engine in self.engines.values() if engine.due(now)]
        if due:
            await asyncio.gather(*due)

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
