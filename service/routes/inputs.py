"""What every inference route shares: image sources (base64, upload, allowed URL), the
per-request image limit, decoding + letterboxing, timings and the documented errors."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Awaitable, Sequence, TypeVar

import numpy as np
from fastapi import UploadFile

from glipv2.boxes import Letterbox
from glipv2.image import PAD_VALUE
from service.batcher import Timed
from service.errors import InvalidInput, PayloadTooLarge, RequestTimeout
from service.images import ImageURL, decode_base64, decode_letterboxed, fetch_url, parse_allowlist
from service.schemas import ErrorResponse, Timings
from service.settings import Settings

Source = str | bytes | ImageURL
T = TypeVar("T")


AUTH_ERRORS = {
    401: {"model": ErrorResponse, "description": "missing or wrong X-API-Key header (when GLIPV2_API_KEY is set)"},
    503: {"model": ErrorResponse, "description": "model not loaded or backend down; Retry-After says when to retry"},
}


def error_responses(bad_text: str, upload: bool = False) -> dict:
    """The OpenAPI error list of an inference route; bad_text names its own 422 causes.
    The README's error table lists the same codes (tests/test_service_fuzz.py checks)."""
    out = {
        400: {"model": ErrorResponse, "description": "unparsable multipart body" if upload else
              "unparsable body (JSON that is not an object of the documented shape is a 422)"},
        **AUTH_ERRORS,
        403: {"model": ErrorResponse, "description": "image URL not on GLIPV2_URL_ALLOWLIST, resolving to a "
              "non-public address, or redirecting elsewhere"},
        408: {"model": ErrorResponse, "description": "the body did not arrive within GLIPV2_BODY_TIMEOUT_S"},
        413: {"model": ErrorResponse, "description": "body, image bytes, image pixels or images per request over a "
              "limit"},
        415: {"model": ErrorResponse, "description": "image is not JPEG, PNG or WebP"},
        422: {"model": ErrorResponse, "description": "invalid JSON or fields (exactly one of image/url per item), "
              "bad base64, corrupt image, image URLs disabled or unfetchable, " + bad_text},
        501: {"model": ErrorResponse, "description": "the served model lacks this task's head"},
        503: {"model": ErrorResponse, "description": "overloaded (too many requests or body bytes in progress, queue "
              "full), backend down or model not loaded; always with Retry-After"},
        504: {"model": ErrorResponse, "description": "request (fetching, decoding, queue, inference) took longer "
              "than GLIPV2_REQUEST_TIMEOUT_S"},
    }
    if upload:
        out[422]["description"] = "missing or invalid form fields, empty or corrupt image, " + bad_text
    return out


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


def _decode(raw: bytes, max_pixels: int, image_hw: tuple[int, int], pad_value: int | Sequence[int] = PAD_VALUE,
            max_side: int = 0) -> LoadedImage:
    """Blocking: bytes -> letterboxed pixels (a JPEG decoded at reduced DCT scale, see
    service.images.decode_letterboxed). Only the small letterboxed copy outlives the call,
    so the decoded pixels in memory are at most one image per decode thread."""
    pixels, lb, size = decode_letterboxed(raw, max_pixels, image_hw, pad_value, max_side)
    return LoadedImage(pixels, lb, size)


class ImageLoader:
    """Fetches and decodes the images of requests in pools of its own: decoding in
    `decode_threads` threads (so the full-size pixels in flight are bounded however many
    requests arrive, and the default pool stays free for readiness checks), URL fetches
    in another (a slow origin holds a fetch thread, never a decoder)."""

    def __init__(self, settings: Settings, image_hw: tuple[int, int],
                 pad_value: int | Sequence[int] = PAD_VALUE, max_side: int = 0) -> None:
        self.pad_value, self.max_side = pad_value, max_side  # the manifest's image layout
        self.settings = settings
        self.image_hw = tuple(image_hw)
        self.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        self.fetch_pool = ThreadPoolExecutor(settings.url_fetch_threads, thread_name_prefix="fetch")
        self.allowlist = parse_allowlist(settings.url_allowlist)

    async def run(self, fn, *args):
        """fn(*args) in the decode pool (tokenizing, decoding: the request's CPU work)."""
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, fn, *args)

    async def _raw(self, image: Source) -> bytes:
        s = self.settings
        if isinstance(image, ImageURL):
            return await asyncio.get_running_loop().run_in_executor(
                self.fetch_pool, functools.partial(fetch_url, image.url, self.allowlist, max_bytes=s.max_body_bytes,
                                                   timeout_s=s.url_timeout_s, max_redirects=s.url_max_redirects,
                                                   allow_private=s.url_allow_private))
        return decode_base64(image, s.max_body_bytes) if isinstance(image, str) else image

    async def _one(self, image: Source) -> LoadedImage:
        return await self.run(_decode, await self._raw(image), self.settings.max_image_pixels, self.image_hw,
                              self.pad_value, self.max_side)

    async def load(self, images: Sequence[Source]) -> list[LoadedImage]:
        """Every image fetched/decoded (base64 str, raw bytes or an allowed URL) and
        letterboxed. When one fails, or the request's deadline cancels this, the images
        not started yet are never decoded."""
        tasks = [asyncio.ensure_future(self._one(im)) for im in images]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()

    def close(self) -> None:
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.fetch_pool.shutdown(wait=False, cancel_futures=True)


async def within_deadline(settings: Settings, work: Awaitable[T]) -> T:
    """The request's whole work (fetching, decoding, queue, inference) within
    request_timeout_s, else 504 (decoding used to run outside any deadline)."""
    try:
        return await asyncio.wait_for(work, settings.request_timeout_s)
    except asyncio.TimeoutError:
        raise RequestTimeout(f"request took longer than {settings.request_timeout_s:g} s",
                             limit=settings.request_timeout_s) from None


def timings(started: float, decoded: float, done: float, timed: Sequence[Timed]) -> Timings:
    return Timings(
        decode_ms=round((decoded - started) * 1000, 3),
        queue_ms=round(max(t.queue_ms for t in timed), 3),
        inference_ms=round(max(t.run_ms for t in timed), 3),
        total_ms=round((done - started) * 1000, 3),
    )
