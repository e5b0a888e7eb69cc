"""POST /v1/detect (JSON, base64 images), /v1/detect/upload (multipart) and /v1/ground (caption +
phrase spans, or noun phrases found automatically): images + prompts -> boxes (xyxy,
original-image pixels). JSON items may give a `url` instead of base64 where
GLIPV2_URL_ALLOWLIST is set (service.images.fetch_url)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, UploadFile

from glipv2.phrases import noun_phrases
from glipv2.postprocess import PostprocessConfig
from glipv2.text import EmptyPromptError, Prompt, prompt_from_spans
from service.backends import Backend, BatchItem
from service.deps import BackendDep, BatcherDep, LoaderDep, SettingsDep, require_api_key
from service.routes.inputs import (ImageLoader, Source, check_image_count, error_responses, read_upload, source_of,
                                   timings, within_deadline)
from service.schemas import (
    MAX_PROMPT_CHARS,
    Detection,
    DetectRequest,
    DetectResponse,
    GroundImageResult,
    GroundRequest,
    GroundResponse,
    ImageResult,
)
from service.settings import Settings

router = APIRouter(prefix="/v1", tags=["detect"], dependencies=[Depends(require_api_key)])

_BAD_PROMPT = "empty or over-long prompt (256 tokens), (/ground) a caption without noun phrases"
_ERRORS = error_responses(_BAD_PROMPT)
_UPLOAD_ERRORS = error_responses(_BAD_PROMPT, upload=True)


async def _detect(settings: Settings, backend: Backend, batcher, loader: ImageLoader, images: list[Source],
                  prompts: list, cfg: PostprocessConfig) -> DetectResponse:
    started = time.perf_counter()
    check_image_count(settings, len(images))
    # Tokenize every prompt first (cheap, fails fast), then fetch/decode/letterbox.
    tokenized = await loader.run(lambda: [backend.tokenize(p) for p in prompts])
    loaded = await loader.load(images)
    items = [BatchItem(pixels=im.pixels, letterbox=im.letterbox, prompt=prompt, postprocess=cfg)
             for im, prompt in zip(loaded, tokenized)]
    decoded = time.perf_counter()
    timed = await batcher.submit_many(items)
    results = []
    for item, im, t in zip(items, loaded, timed):
        (w, h), det, phrases = im.size, t.value, item.prompt.prompt.phrases
        results.append(ImageResult(
            width=w, height=h, prompt=item.prompt.prompt.text, phrases=list(phrases),
            detections=[
                Detection(box=[round(float(v), 2) for v in box], score=round(float(s), 4),
                          phrase=phrases[int(p)], phrase_index=int(p))
                for box, s, p in zip(det.boxes, det.scores, det.phrase_ids)
            ],
        ))
    done = time.perf_counter()
    return DetectResponse(model=backend.manifest.preset, results=results,
                          timings=timings(started, decoded, done, timed))


@router.post("/detect", response_model=DetectResponse, responses=_ERRORS,
             summary="Detect the phrases of a prompt in one or more images (JSON, base64 images)")
async def detect(req: DetectRequest, settings: SettingsDep, backend: BackendDep, batcher: BatcherDep,
                 loader: LoaderDep) -> DetectResponse:
    cfg = backend.manifest.postprocess_with(req.score_threshold, req.max_detections)
    return await within_deadline(settings, _detect(settings, backend, batcher, loader,
                                                   [source_of(it) for it in req.images],
                                                   [it.prompt for it in req.images], cfg))


def ground_prompt(caption: str, spans: list | None) -> tuple[Prompt, str]:
    """The caption's prompt from the given spans, or from its noun phrases when spans is
    None (422 when the caption has none). Returns (prompt, 'given' | 'automatic')."""
    if spans is not None:
        return prompt_from_spans(caption, spans), "given"  # PromptError -> 422
    found = noun_phrases(caption)
    if not found:
        raise EmptyPromptError(
            "no noun phrase found in the caption to ground; give the phrases as character spans in 'phrases'"
        )
    return prompt_from_spans(caption, [list(s) for s in found]), "automatic"


@router.post("/ground", response_model=GroundResponse, responses=_ERRORS,
             summary="Ground the phrases of a caption (given as character spans, or its noun phrases) in images")
async def ground(req: GroundRequest, settings: SettingsDep, backend: BackendDep, batcher: BatcherDep,
                 loader: LoaderDep) -> GroundResponse:
    """Each detection's phrase_index is the index of the phrase in `phrases`; phrase is the
    caption text it covers. Without `phrases`, the caption's noun phrases are grounded
    (rule-based chunker, glipv2.phrases) and each result's `phrase_spans` says which."""
    cfg = backend.manifest.postprocess_with(req.score_threshold, req.max_detections)
    built = [ground_prompt(it.caption, it.phrases) for it in req.images]
    out = await within_deadline(settings, _detect(settings, backend, batcher, loader,
                                                  [source_of(it) for it in req.images], [p for p, _ in built], cfg))
    return GroundResponse(
        model=out.model,
        timings=out.timings,
        results=[
            GroundImageResult(**res.model_dump(), phrases_source=source,
                              phrase_spans=[[list(span) for span in spans] for spans in prompt.phrase_spans])
            for res, (prompt, source) in zip(out.results, built)
        ],
    )


@router.post("/detect/upload", response_model=DetectResponse, responses=_UPLOAD_ERRORS,
             summary="Detect the phrases of a prompt in one uploaded image (multipart/form-data)")
async def detect_upload(
    settings: SettingsDep,
    backend: BackendDep,
    batcher: BatcherDep,
    loader: LoaderDep,
    image: Annotated[UploadFile, File(description="JPEG, PNG or WebP file")],
    prompt: Annotated[str, Form(min_length=1, max_length=MAX_PROMPT_CHARS,
                                description="phrases separated by '.': 'red circle. star.'")],
    score_threshold: Annotated[float | None, Form(ge=0.0, le=1.0)] = None,
    max_detections: Annotated[int | None, Form(ge=1, le=1000)] = None,
) -> DetectResponse:
    cfg = backend.manifest.postprocess_with(score_threshold, max_detections)
    return await within_deadline(settings, _detect(settings, backend, batcher, loader, [await read_upload(image)],
                                                   [prompt], cfg))
