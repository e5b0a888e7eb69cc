"""Liveness and readiness."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.schemas import HealthResponse

router = APIRouter(prefix="/health", tags=["health"])
log = logging.getLogger("service")

READY_TIMEOUT_S = 5.0


@router.get("/live", response_model=HealthResponse)
async def live() -> HealthResponse:
    """The process answers HTTP."""
    return HealthResponse(status="ok")


@router.get("/ready", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def ready(request: Request):
    """Ready only when the model is loaded, the batcher runs and the backend answers a
    (tiny) text-encoder call within 5 s."""
    backend = getattr(request.app.state, "backend", None)
    batcher = getattr(request.app.state, "batcher", None)
    retry = {"Retry-After": str(request.app.state.settings.retry_after_s)}
    if backend is None or batcher is None:
        return JSONResponse(status_code=503, content={"status": "unavailable", "detail": "model not loaded"},
                            headers=retry)
    try:
        await asyncio.wait_for(asyncio.to_thread(backend.ping), READY_TIMEOUT_S)
    except Exception as exc:  # any failure means not ready; the reason goes to the caller and the log
        log.warning("readiness check failed: %r", exc)
        return JSONResponse(status_code=503, content={"status": "unavailable", "detail": f"backend: {exc!r}"},
                            headers=retry)
    return HealthResponse(status="ok")
