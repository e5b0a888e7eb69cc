"""The demo page at / : plain HTML + JS from service/static/ (no build step, nothing from a
CDN). It posts to /v1/detect/upload and draws the boxes on a canvas. Not in the OpenAPI
schema; public even when an API key is set (the page sends the key the user types)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse

from glipv2.postprocess import SERVING_SCORE_THRESHOLD

from service.errors import ServiceError

STATIC = Path(__file__).resolve().parents[1] / "static"
# A fixed list, so a request can never name any other file.
_ASSETS = {"demo.js": "text/javascript", "demo.css": "text/css"}
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["demo"], include_in_schema=False)


class NotFound(ServiceError):
    status_code = 404


@router.get("/")
async def index(request: Request) -> HTMLResponse:
    """The page, its threshold slider starting at the served model's default (the one the
    API applies when a request names none), so the page shows what the API would answer."""
    backend = request.app.state.backend
    threshold = backend.manifest.postprocess.score_threshold if backend is not None else SERVING_SCORE_THRESHOLD
    html = (STATIC / "index.html").read_text(encoding="utf-8").replace("{{score_threshold}}", f"{threshold:.2f}")
    return HTMLResponse(html, headers=_HEADERS)


@router.get("/static/{name}")
async def asset(name: str) -> FileResponse:
    if name not in _ASSETS:
        raise NotFound(f"no static file {name!r}")
    return FileResponse(STATIC / name, media_type=_ASSETS[name], headers=_HEADERS)
