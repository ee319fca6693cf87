"""vLLM endpoint plugin: gemmguard's routes inside vLLM's own OpenAI API server.

Loaded by vLLM only when `VLLM_PLUGINS` names it (`gemmguard serve` does that). The routes
read state that `init_state` gathers from every worker through `collective_rpc`, after the
engine is up and before the server accepts connections.
"""

from __future__ import annotations

import logging
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

import gemmguard
from gemmguard import vllm_adapter
from gemmguard.build import build_info
from gemmguard.config import settings
from gemmguard.metrics import process_metrics

logger = logging.getLogger("gemmguard")

PLUGIN_NAME = "gemmguard_api"

router = APIRouter(prefix="/gemmguard", tags=["gemmguard"])


@dataclass
class GemmguardState:
    """What the API server knows about the engine, gathered once at start-up."""

    engine_client: Any
    api_server: dict[str, str] = field(default_factory=build_info)
    ranks: list[dict[str, Any]] = field(default_factory=list)
    kernels: list[list[dict[str, Any]]] = field(default_factory=list)
    initialized: bool = False


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
        {"gemmguard": gemmguard.__version__, "api_server": state.api_server, "ranks": state.ranks}
    )


@router.get("/v1/kernels")
async def get_kernels(request: Request) -> JSONResponse:
    """Per rank, per layer: the kernel vLLM chose and the candidates it turned down, and why."""
    state = _state(request)
    if state is None or not state.initialized:
        return _not_ready("gemmguard has not gathered the kernel reports yet")
    return JSONResponse(
        {"ranks": [{"rank": i, "layers": rows} for i, rows in enumerate(state.kernels)]}
    )


@router.get("/ready")
async def get_ready(request: Request) -> JSONResponse:
    """200 once gemmguard's start-up checks have passed; 503 with the reason otherwise."""
    state = _state(request)
    if state is None or not state.initialized:
        return _not_ready("gemmguard start-up checks have not finished")
    return JSONResponse({"ready": True})


class GemmguardEndpoints:
    """The `vllm.endpoint_plugins` entry: a zero-argument factory vLLM calls."""

    name = PLUGIN_NAME
    # No task requirement: the routes work for every served model.
    required_tasks = None

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        gg = GemmguardState(engine_client=engine_client)
        state.gemmguard = gg
        if engine_client is None:
            logger.warning("gemmguard: no engine in this server (render-only); routes answer 503")
            return
        gg.ranks = list(await engine_client.collective_rpc("gemmguard_build_info"))
        gg.kernels = list(await engine_client.collective_rpc("gemmguard_kernel_report"))
        metrics = process_metrics()
        metrics.publish_build(gg.ranks[0] if gg.ranks else gg.api_server)
        metrics.publish_kernels(
            (row for rows in gg.kernels for row in rows),
            per_layer=settings().per_layer_metrics,
            # Counters are summed over API servers in multiprocess mode: count them once.
            count_fallbacks=vllm_adapter.api_server_index(engine_client) == 0,
        )
        gg.initialized = True
        logger.info("gemmguard: %d rank(s) reported; routes under /gemmguard/", len(gg.ranks))
