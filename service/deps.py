"""FastAPI dependencies, as Annotated aliases."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader

from service.backends import Backend
from service.batcher import MicroBatcher
from service.errors import BackendUnavailable, Unauthorized
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


SettingsDep = Annotated[Settings, Depends(get_settings)]
LoaderDep = Annotated[ImageLoader, Depends(get_loader)]
BackendDep = Annotated[Backend, Depends(get_backend)]
BatcherDep = Annotated[MicroBatcher, Depends(get_batcher)]


def require_api_key(settings: SettingsDep, key: Annotated[str | None, Depends(_api_key_header)]) -> None:
    expected = settings.api_key
    if expected is None:
        return
    if key is None or not secrets.compare_digest(key.encode(), expected.get_secret_value().encode()):
        raise Unauthorized("missing or wrong X-API-Key header", headers={"WWW-Authenticate": "APIKey"})
