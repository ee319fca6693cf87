"""vLLM endpoint plugin: gemmguard's routes inside vLLM's own OpenAI API server.

Loaded by vLLM only when `VLLM_PLUGINS` names it (`gemmguard serve` does that). The routes
read state that `init_state` gathers from every worker of every data-parallel engine (the
utility `collective_rpc`, sent to each engine), after the engines are up and before the server
accepts connections.
"""

from __future__ import annotations

import logging
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

import gemmguard
from gemmguard import plugin, vllm_adapter
from gemmguard.build import build_info
from gemmguard.canary import CanaryConfig, Liveness
from gemmguard.config import settings
from gemmguard.metrics import process_metrics
from gemmguard.selfcheck.policy import Outcome, refuse, summary

# A child of vLLM's logger, so gemmguard's lines use vLLM's handler and format.
logger = logging.getLogger("vllm.gemmguard")

PLUGIN_NAME = "gemmguard_api"

router = APIRouter(prefix="/gemmguard", tags=["gemmguard"])


@dataclass
class GemmguardState:
    """What the API server knows about the engine, gathered once at start-up."""

    engine_client: Any
    api_server: dict[str, str] = field(default_factory=dict)
    ranks: list[dict[str, Any]] = field(default_factory=list)
    kernels: list[list[dict[str, Any]]] = field(default_factory=list)
    selfcheck: Outcome | None = None
    fixes: list[list[dict[str, str]]] = field(default_factory=list)
    liveness: Liveness | None = None
    initialized: bool = False

    def api_server_info(self) -> dict[str, str]:
        """This process's build info, made when first asked. Making it installs gemmguard's
        hooks in this process (`plugin.defer` held them back), off the path to /health."""
        if not self.api_server:
            plugin.ensure_registered()
            self.api_server = build_info()
        return self.api_server

    def rank_of(self, index: int) -> int:
        """The rank across engines of the index-th answer, as that worker reported it: the
        one number every route and metric labels a rank with."""
        info = self.ranks[index] if index < len(self.ranks) else {}
        return int(info.get("rank", index))


def _state(request: Request) -> GemmguardState | None:
    return getattr(request.app.state, "gemmguard", None)


def _not_ready(reason: str) -> JSONResponse:
    return JSONResponse({"ready": False, "reason": reason}, status_code=503)


@router.get("/v1/build")
async def get_build(request: Request) -> JSONResponse:
    """gemmguard, vLLM and torch versions, platform and device, of the API server and each rank."""
    state = _state(request)
    if state is None or not state.initialized:
        return _not_ready("gemmguard has not gathered the engine's build info yet")
    return JSONResponse(
        {"gemmguard": gemmguard.__version__, "api_server": state.api_server_info(),
         "ranks": state.ranks}
    )


@router.get("/v1/kernels")
async def get_kernels(request: Request) -> JSONResponse:
    """Per rank, per layer: the kernel vLLM chose and the candidates it turned down, and why."""
    state = _state(request)
    if state is None or not state.initialized:
        return _not_ready("gemmguard has not gathered the kernel reports yet")
    return JSONResponse(
        {"ranks": [{"rank": state.rank_of(i), "layers": rows}
                   for i, rows in enumerate(state.kernels)]}
    )


@router.get("/v1/fixes")
async def get_fixes(request: Request) -> JSONResponse:
    """Each carried engine fix, per rank: upstream, patched, missing, not_applicable or unknown."""
    state = _state(request)
    if state is None or not state.initialized:
        return _not_ready("gemmguard has not gathered the fix reports yet")
    ranks = [{"rank": state.rank_of(i), "fixes": rows} for i, rows in enumerate(state.fixes)]
    return JSONResponse({"ranks": ranks})


@router.get("/v1/selfcheck")
async def get_selfcheck(request: Request) -> JSONResponse:
    """The start-up self-check's full report: per rank and layer, bits, verdicts, fallbacks."""
    state = _state(request)
    if state is None or state.selfcheck is None:
        return _not_ready("the start-up self-check has not run yet")
    return JSONResponse(state.selfcheck.as_dict())


@router.get("/live")
async def get_live(request: Request) -> JSONResponse:
    """200 while the engine produces tokens (canary or real requests); 503 with the reason."""
    state = _state(request)
    if state is None or state.liveness is None:
        return JSONResponse({"live": False, "reason": "gemmguard has not started"}, 503)
    liveness = state.liveness
    body = {"live": liveness.live, "reason": liveness.reason(),
            "canaries_sent": liveness.canaries_sent, "engines": liveness.state()}
    return JSONResponse(body, status_code=200 if liveness.live else 503)


@router.get("/ready")
async def get_ready(request: Request) -> JSONResponse:
    """200 once the start-up self-check has passed (or warned) and the engine is live."""
    state = _state(request)
    if state is None or not state.initialized or state.selfcheck is None:
        return _not_ready("gemmguard start-up checks have not finished")
    if not state.selfcheck.serves:
        return _not_ready(state.selfcheck.as_dict()["summary"])
    if state.liveness is not None and not state.liveness.live:
        return _not_ready(f"engine not live: {state.liveness.reason()}")
    body: dict[str, Any] = {"ready": True, "selfcheck_passed": state.selfcheck.passed,
                            "selfcheck_complete": state.selfcheck.complete}
    return JSONResponse(body)


class GemmguardEndpoints:
    """The `vllm.endpoint_plugins` entry: a zero-argument factory vLLM calls."""

    name = PLUGIN_NAME
    # No task requirement: the routes work for every served model.
    required_tasks = None

    def attach_router(self, app: FastAPI) -> None:
        # No middleware: liveness takes its evidence from the engine's tokens
        # (gemmguard.stat_logger), so nothing of gemmguard runs per request.
        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        gg = GemmguardState(engine_client=engine_client)
        state.gemmguard = gg
        if engine_client is None:
            logger.warning("gemmguard: no engine in this server (render-only); routes answer 503")
            return
        cfg = settings()

        async def every_rank(method: str) -> list[Any]:
            # Engines in data-parallel order, each engine's ranks in order: the list index is
            # the rank across engines that the workers report.
            engines = await vllm_adapter.collective_rpc_every_engine(engine_client, method)
            return [answer for ranks in engines for answer in ranks]

        gg.ranks = await every_rank("gemmguard_build_info")
        gg.kernels = await every_rank("gemmguard_kernel_report")
        gg.fixes = await every_rank("gemmguard_fixes")
        metrics = process_metrics()
        # Every rank's, with its rank: a fix missing on one node must show.
        metrics.publish_build(gg.ranks or [gg.api_server_info()])
        metrics.publish_fixes((gg.rank_of(i), rows) for i, rows in enumerate(gg.fixes))
        metrics.publish_kernels(
            (row for rows in gg.kernels for row in rows),
            per_layer=cfg.per_layer_metrics,
            # Counters are summed over API servers in multiprocess mode: count them once.
            count_fallbacks=vllm_adapter.api_server_index(engine_client) == 0,
        )
        # The engine checked (and, by policy, replaced) every layer at load, and a refusing
        # engine never gets here, unless its loader bypassed the check: then the ranks report
        # every GEMM unseen, and --selfcheck-unchecked fail refuses here.
        gg.selfcheck = Outcome(cfg.selfcheck_policy, await every_rank("gemmguard_selfcheck"),
                               cfg.selfcheck_unchecked)
        metrics.publish_selfcheck(gg.selfcheck, per_layer=cfg.per_layer_metrics)
        report = summary(gg.selfcheck)
        quiet = gg.selfcheck.passed or (not gg.selfcheck.failing
                                         and cfg.selfcheck_unchecked == "allow")
        (logger.info if quiet else logger.warning)("%s", report)
        if not gg.selfcheck.serves:
            refuse(gg.selfcheck, cfg.selfcheck_report_file, "s-api-server")
        engines = sorted({int(info.get("data_parallel_rank", 0)) for info in gg.ranks}) or [0]
        gg.liveness = Liveness(engine_client, CanaryConfig(
            enabled=cfg.canary_interval > 0, interval=cfg.canary_interval,
            deadline=cfg.canary_deadline, prompt=cfg.canary_prompt), metrics, engines=engines)
        gg.liveness.start()
        gg.initialized = True
        logger.info("gemmguard: %d rank(s) of %d engine(s) reported; routes under /gemmguard/",
                    len(gg.ranks), len(engines))
