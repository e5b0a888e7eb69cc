"""Domain exceptions and their HTTP mapping, in one place.

Bad input never becomes a 500: every error the gateway expects has a class here with its
status code, and `install_error_handlers` maps them (and the prompt errors of
glipv2.text) to JSON bodies {"detail": ..., "limit": ...?}.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from glipv2.text import PromptError, PromptTooLongError
from glipv2.runtime.batch import TaskUnavailable

log = logging.getLogger("service")


class ServiceError(Exception):
    status_code = 500

    def __init__(self, detail: str, *, limit: int | float | None = None, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.detail = detail
        self.limit = limit
        self.headers = headers or {}

    def body(self) -> dict:
        out: dict = {"detail": self.detail}
        if self.limit is not None:
            out["limit"] = self.limit
        return out


class Unauthorized(ServiceError):
    status_code = 401


class PayloadTooLarge(ServiceError):
    """Body bytes, image bytes or image pixels over a limit."""

    status_code = 413


class UnsupportedMediaType(ServiceError):
    """Not a JPEG, PNG or WebP image."""

    status_code = 415


class InvalidInput(ServiceError):
    """Well-formed request with unusable content (bad base64, corrupt image, bad prompt)."""

    status_code = 422


class NotSupported(ServiceError):
    """The served model lacks what the request needs (e.g. a VQA head)."""

    status_code = 501


class Overloaded(ServiceError):
    """The batcher's queue is full: retry later."""

    status_code = 503

    def __init__(self, detail: str, *, retry_after_s: int = 1, limit: int | None = None):
        super().__init__(detail, limit=limit, headers={"Retry-After": str(retry_after_s)})


class BackendUnavailable(ServiceError):
    """The model is not loaded, the gateway is stopping, or the backend failed a call
    (Triton down). Answered 503 with Retry-After, like Overloaded."""

    status_code = 503


class RequestTimeout(ServiceError):
    status_code = 504


def _json(status: int, body: dict, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=body, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        log.info("%s %s -> %d: %s", request.method, request.url.path, exc.status_code, exc.detail)
        headers = dict(exc.headers)
        if exc.status_code == 503:  # every 503 says when to come back (the README promises it)
            headers.setdefault("Retry-After", str(request.app.state.settings.retry_after_s))
        return _json(exc.status_code, exc.body(), headers)

    @app.exception_handler(TaskUnavailable)
    async def _task_unavailable(request: Request, exc: TaskUnavailable) -> JSONResponse:
        return _json(NotSupported.status_code, {"detail": str(exc)})

    @app.exception_handler(PromptError)
    async def _prompt_error(request: Request, exc: PromptError) -> JSONResponse:
        body: dict = {"detail": str(exc)}
        if isinstance(exc, PromptTooLongError):
            body["limit"] = exc.limit
        return _json(422, body)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default shape, minus the raw input (which may be megabytes of base64).
        errors = [{k: v for k, v in e.items() if k not in ("input", "ctx", "url")} for e in exc.errors()]
        return _json(422, {"detail": errors})
