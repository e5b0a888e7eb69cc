"""FastAPI dependencies, as Annotated aliases."""

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


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_backend(request: Request) -> Backend:
    backend = getattr(request.app.state, "backend", None)
    if backend is None:
        raise BackendUnavailable("the model is not loaded")
    return backend


def get_batcher(request: Request) -> MicroBatcher:
    batcher = getattr(request.app.state, "batcher", None)
    if batcher is None:
        raise BackendUnavailable("the batcher is not running")
    return batcher


def get_loader(request: Request) -> ImageLoader:
    loader = getattr(request.app.state, "loader", None)
    if loader is None:
        raise BackendUnavailable("the gateway is not running (starting up or shutting down)")
    return loader


def get_batchers(request: Request) -> dict[str, MicroBatcher]:
    """One batcher per task the model serves ({} before startup)."""
    return getattr(request.app.state, "batchers", None) or {}


def task_batcher(request: Request, task: str) -> MicroBatcher:
    """The batcher of `task` ("vqa", "caption"): 501 when the served model lacks the head,
    503 while no model is loaded."""
    backend = getattr(request.app.state, "backend", None)
    if backend is not None and task not in backend.tasks:
        what = "VQA head" if task == "vqa" else "caption decoder"
        raise NotSupported(f"the served model has no {what}; export a checkpoint trained with "
                           f"{'VQA' if task == 'vqa' else 'captions'} (see docs/architecture.md)")
    batcher = get_batchers(request).get(task)
    if batcher is None:
        raise BackendUnavailable("the model is not loaded")
    return batcher


def get_vqa_batcher(request: Request) -> MicroBatcher:
    return task_batcher(request, "vqa")


def get_caption_batcher(request: Request) -> MicroBatcher:
    return task_batcher(request, "caption")


SettingsDep = Annotated[Settings, Depends(get_settings)]
LoaderDep = Annotated[ImageLoader, Depends(get_loader)]
BackendDep = Annotated[Backend, Depends(get_backend)]
BatcherDep = Annotated[MicroBatcher, Depends(get_batcher)]
BatchersDep = Annotated[dict[str, MicroBatcher], Depends(get_batchers)]
VqaBatcherDep = Annotated[MicroBatcher, Depends(get_vqa_batcher)]
CaptionBatcherDep = Annotated[MicroBatcher, Depends(get_caption_batcher)]


def require_api_key(settings: SettingsDep, key: Annotated[str | None, Depends(_api_key_header)]) -> None:
    expected = settings.api_key
    if expected is None:
        return
    if key is None or not secrets.compare_digest(key.encode(), expected.get_secret_value().encode()):
        raise Unauthorized("missing or wrong X-API-Key header", headers={"WWW-Authenticate": "APIKey"})
