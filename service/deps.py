"""FastAPI dependencies, as Annotated aliases.

All of them are `async def`: they only read app.state, and FastAPI runs a plain `def`
dependency in its thread pool, a thread hop each (five per detection request) that cost
more than the work, and on a busy CPU waited for a thread to be scheduled every time."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader

from service.backends import Backend
from service.batcher import MicroBatcher
from service.errors import BackendUnavailable, NotSupported, Unauthorized
from service.routes.inputs import ImageLoader
from service.settings import Settings

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_backend(request: Request) -> Backend:
    backend = getattr(request.app.state, "backend", None)
    if backend is None:
        raise BackendUnavailable("the model is not loaded")
    return backend


async def get_batcher(request: Request) -> MicroBatcher:
    batcher = getattr(request.app.state, "batcher", None)
    if batcher is None:
        raise BackendUnavailable("the batcher is not running")
    return batcher


async def get_loader(request: Request) -> ImageLoader:
    loader = getattr(request.app.state, "loader", None)
    if loader is None:
        raise BackendUnavailable("the gateway is not running (starting up or shutting down)")
    return loader


def _batchers(request: Request) -> dict[str, MicroBatcher]:
    return getattr(request.app.state, "batchers", None) or {}


async def get_batchers(request: Request) -> dict[str, MicroBatcher]:
    """One batcher per task the model serves ({} before startup)."""
    return _batchers(request)


def task_batcher(request: Request, task: str) -> MicroBatcher:
    """The batcher of `task` ("vqa", "caption"): 501 when the served model lacks the head,
    503 while no model is loaded."""
    backend = getattr(request.app.state, "backend", None)
    if backend is not None and task not in backend.tasks:
        what = "VQA head" if task == "vqa" else "caption decoder"
        raise NotSupported(f"the served model has no {what}; export a checkpoint trained with "
                           f"{'VQA' if task == 'vqa' else 'captions'} (see docs/architecture.md)")
    batcher = _batchers(request).get(task)
    if batcher is None:
        raise BackendUnavailable("the model is not loaded")
    return batcher


async def get_vqa_batcher(request: Request) -> MicroBatcher:
    return task_batcher(request, "vqa")


async def get_caption_batcher(request: Request) -> MicroBatcher:
    return task_batcher(request, "caption")


SettingsDep = Annotated[Settings, Depends(get_settings)]
LoaderDep = Annotated[ImageLoader, Depends(get_loader)]
BackendDep = Annotated[Backend, Depends(get_backend)]
BatcherDep = Annotated[MicroBatcher, Depends(get_batcher)]
BatchersDep = Annotated[dict[str, MicroBatcher], Depends(get_batchers)]
VqaBatcherDep = Annotated[MicroBatcher, Depends(get_vqa_batcher)]
CaptionBatcherDep = Annotated[MicroBatcher, Depends(get_caption_batcher)]


async def require_api_key(settings: SettingsDep, key: Annotated[str | None, Depends(_api_key_header)]) -> None:
    expected = settings.api_key
    if expected is None:
        return
    if key is None or not secrets.compare_digest(key.encode(), expected.get_secret_value().encode()):
        raise Unauthorized("missing or wrong X-API-Key header", headers={"WWW-Authenticate": "APIKey"})
