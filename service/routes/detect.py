"""POST /v1/detect (JSON, base64 images), /v1/detect/upload (multipart) and /v1/ground (caption +
phrase spans): images + prompts -> boxes (xyxy, original-image pixels)."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, UploadFile

from glipv2.image import letterbox
from glipv2.postprocess import PostprocessConfig
from glipv2.text import prompt_from_spans
from service.backends import Backend, BatchItem
from service.deps import BackendDep, BatcherDep, SettingsDep, require_api_key
from service.errors import InvalidInput, PayloadTooLarge
from service.images import decode_base64, decode_image
from service.schemas import (
    MAX_PROMPT_CHARS,
    Detection,
    DetectRequest,
    DetectResponse,
    ErrorResponse,
    GroundRequest,
    ImageResult,
    Timings,
)
from service.settings import Settings

router = APIRouter(prefix="/v1", tags=["detect"], dependencies=[Depends(require_api_key)])

_ERRORS = {
    413: {"model": ErrorResponse, "description": "body, image bytes or image pixels over a limit"},
    415: {"model": ErrorResponse, "description": "image is not JPEG, PNG or WebP"},
    422: {"model": ErrorResponse, "description": "bad base64, corrupt image, empty or over-long prompt (256 tokens)"},
    503: {"model": ErrorResponse, "description": "queue full (Retry-After) or model not loaded"},
    504: {"model": ErrorResponse, "description": "request took longer than the timeout"},
}


def _postprocess_config(backend: Backend, score_threshold: float | None, max_detections: int | None) -> PostprocessConfig:
    defaults = backend.manifest.get("postprocess", {})
    fields = {k: defaults[k] for k in ("score_threshold", "pre_nms_topk", "nms_iou", "max_detections") if k in defaults}
    if score_threshold is not None:
        fields["score_threshold"] = float(score_threshold)
    if max_detections is not None:
        fields["max_detections"] = int(max_detections)
    return PostprocessConfig(**fields)


def _prepare(backend: Backend, settings: Settings, images: list[str | bytes], prompts: list, cfg: PostprocessConfig
             ) -> tuple[list[BatchItem], list[tuple[int, int]]]:
    """Blocking (run in a thread): tokenize every prompt first (cheap, fails fast), then
    decode (base64 str or raw bytes) and letterbox every image."""
    tokenized = [backend.tokenize(p) for p in prompts]
    items, sizes = [], []
    for image, prompt in zip(images, tokenized):
        raw = decode_base64(image, settings.max_body_bytes) if isinstance(image, str) else image
        pixels_hwc = decode_image(raw, settings.max_image_pixels)
        pixels, lb = letterbox(pixels_hwc, backend.image_hw)
        items.append(BatchItem(pixels=pixels, letterbox=lb, prompt=prompt, postprocess=cfg))
        sizes.append((pixels_hwc.shape[1], pixels_hwc.shape[0]))
    return items, sizes


async def _detect(settings: Settings, backend: Backend, batcher, images: list[str | bytes], prompts: list,
                  cfg: PostprocessConfig) -> DetectResponse:
    started = time.perf_counter()
    if len(images) > settings.max_images_per_request:
        raise PayloadTooLarge(
            f"{len(images)} images in one request; the limit is {settings.max_images_per_request}",
            limit=settings.max_images_per_request,
        )
    items, sizes = await asyncio.to_thread(_prepare, backend, settings, images, prompts, cfg)
    decoded = time.perf_counter()
    timed = await batcher.submit_many(items)
    results = []
    for item, (w, h), t in zip(items, sizes, timed):
        det, phrases = t.value, item.prompt.prompt.phrases
        results.append(ImageResult(
            width=w, height=h, prompt=item.prompt.prompt.text, phrases=list(phrases),
            detections=[
                Detection(box=[round(float(v), 2) for v in box], score=round(float(s), 4),
                          phrase=phrases[int(p)], phrase_index=int(p))
                for box, s, p in zip(det.boxes, det.scores, det.phrase_ids)
            ],
        ))
    done = time.perf_counter()
    return DetectResponse(
        model=backend.manifest.get("preset", "glipv2"),
        results=results,
        timings=Timings(
            decode_ms=round((decoded - started) * 1000, 3),
            queue_ms=round(max(t.queue_ms for t in timed), 3),
            inference_ms=round(max(t.run_ms for t in timed), 3),
            total_ms=round((done - started) * 1000, 3),
        ),
    )


@router.post("/detect", response_model=DetectResponse, responses=_ERRORS,
             summary="Detect the phrases of a prompt in one or more images (JSON, base64 images)")
async def detect(req: DetectRequest, settings: SettingsDep, backend: BackendDep, batcher: BatcherDep) -> DetectResponse:
    cfg = _postprocess_config(backend, req.score_threshold, req.max_detections)
    return await _detect(settings, backend, batcher, [it.image for it in req.images],
                         [it.prompt for it in req.images], cfg)


@router.post("/ground", response_model=DetectResponse, responses=_ERRORS,
             summary="Ground the given phrases (character spans) of a caption in one or more images")
async def ground(req: GroundRequest, settings: SettingsDep, backend: BackendDep, batcher: BatcherDep) -> DetectResponse:
    """Each detection's phrase_index is the index of the span in `phrases`; phrase is the
    caption text it covers."""
    cfg = _postprocess_config(backend, req.score_threshold, req.max_detections)
    prompts = [prompt_from_spans(it.caption, it.phrases) for it in req.images]  # PromptError -> 422
    return await _detect(settings, backend, batcher, [it.image for it in req.images], prompts, cfg)


@router.post("/detect/upload", response_model=DetectResponse, responses=_ERRORS,
             summary="Detect the phrases of a prompt in one uploaded image (multipart/form-data)")
async def detect_upload(
    settings: SettingsDep,
    backend: BackendDep,
    batcher: BatcherDep,
    image: Annotated[UploadFile, File(description="JPEG, PNG or WebP file")],
    prompt: Annotated[str, Form(min_length=1, max_length=MAX_PROMPT_CHARS,
                                description="phrases separated by '.': 'red circle. star.'")],
    score_threshold: Annotated[float | None, Form(ge=0.0, le=1.0)] = None,
    max_detections: Annotated[int | None, Form(ge=1, le=1000)] = None,
) -> DetectResponse:
    cfg = _postprocess_config(backend, score_threshold, max_detections)
    raw = await image.read()
    if not raw:
        raise InvalidInput("the uploaded image is empty")
    return await _detect(settings, backend, batcher, [raw], [prompt], cfg)
