"""What every inference route shares: image sources (base64, upload, allowed URL), the
per-request image limit, decoding + letterboxing, timings and the documented errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from fastapi import UploadFile

from glipv2.boxes import Letterbox
from glipv2.image import letterbox
from service.backends import Backend
from service.batcher import Timed
from service.errors import InvalidInput, PayloadTooLarge
from service.images import ImageURL, decode_base64, decode_image, fetch_url, parse_allowlist
from service.schemas import ErrorResponse, Timings
from service.settings import Settings

Source = str | bytes | ImageURL


def error_responses(bad_text: str) -> dict:
    """The OpenAPI error list of a route; bad_text names its own 422 causes."""
    return {
        403: {"model": ErrorResponse, "description": "image URL's host (or its redirect's) is not on GLIPV2_URL_ALLOWLIST"},
        413: {"model": ErrorResponse, "description": "body, image bytes or image pixels over a limit"},
        415: {"model": ErrorResponse, "description": "image is not JPEG, PNG or WebP"},
        422: {"model": ErrorResponse, "description": "bad base64, corrupt image, image URLs disabled or unfetchable, "
              + bad_text},
        501: {"model": ErrorResponse, "description": "the served model lacks this task's head"},
        503: {"model": ErrorResponse, "description": "queue full (Retry-After) or model not loaded"},
        504: {"model": ErrorResponse, "description": "request took longer than the timeout"},
    }


def source_of(item) -> Source:
    """A request item's image: base64 text or an ImageURL (the schema ensures exactly one)."""
    return ImageURL(item.url) if item.url is not None else item.image


async def read_upload(upload: UploadFile) -> bytes:
    raw = await upload.read()
    if not raw:
        raise InvalidInput("the uploaded image is empty")
    return raw


def check_image_count(settings: Settings, n: int) -> None:
    if n > settings.max_images_per_request:
        raise PayloadTooLarge(f"{n} images in one request; the limit is {settings.max_images_per_request}",
                              limit=settings.max_images_per_request)


@dataclass
class LoadedImage:
    pixels: np.ndarray  # uint8 [3, H, W], letterboxed to the model input
    letterbox: Letterbox
    size: tuple[int, int]  # original (width, height)


def _raw(image: Source, settings: Settings) -> bytes:
    if isinstance(image, ImageURL):
        return fetch_url(image.url, parse_allowlist(settings.url_allowlist), max_bytes=settings.max_body_bytes,
                         timeout_s=settings.url_timeout_s, max_redirects=settings.url_max_redirects)
    return decode_base64(image, settings.max_body_bytes) if isinstance(image, str) else image


def load_images(backend: Backend, settings: Settings, images: Sequence[Source]) -> list[LoadedImage]:
    """Blocking (run in a thread): fetch/decode (base64 str, raw bytes or an allowed URL)
    and letterbox every image."""
    out = []
    for image in images:
        pixels_hwc = decode_image(_raw(image, settings), settings.max_image_pixels)
        pixels, lb = letterbox(pixels_hwc, backend.image_hw)
        out.append(LoadedImage(pixels, lb, (pixels_hwc.shape[1], pixels_hwc.shape[0])))
    return out


def timings(started: float, decoded: float, done: float, timed: Sequence[Timed]) -> Timings:
    return Timings(
        decode_ms=round((decoded - started) * 1000, 3),
        queue_ms=round(max(t.queue_ms for t in timed), 3),
        inference_ms=round(max(t.run_ms for t in timed), 3),
        total_ms=round((done - started) * 1000, 3),
    )
