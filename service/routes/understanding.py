"""POST /v1/vqa (image + question -> answer, score, ranked answers) and POST /v1/caption
(image -> caption, greedy or beam search; `grounded: true` adds each object phrase of the
caption with its box and score), JSON with base64 images or allowed URLs, plus
multipart /upload variants for one image. Same limits and errors as /v1/detect; each
task has its own micro-batcher, so concurrent questions run as one vqa call and
concurrent caption requests decode as one batch (their grounding is one detector call)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, UploadFile

from glipv2.captioning import DEFAULT_BEAM, MAX_BEAM
from glipv2.runtime.batch import CaptionBatchItem, VqaBatchItem
from glipv2.understanding import GROUNDING_SCORE_FLOOR, GroundedPhrase
from service.batcher import MicroBatcher
from service.deps import BackendDep, CaptionBatcherDep, LoaderDep, SettingsDep, VqaBatcherDep, require_api_key
from service.errors import InvalidInput
from service.routes.inputs import (ImageLoader, Source, check_image_count, error_responses, read_upload, source_of,
                                   timings, within_deadline)
from service.schemas import (CHECKED, MAX_QUESTION_CHARS, MAX_TOP_ANSWERS, CaptionPhrase, CaptionRequest,
                             CaptionResponse, CaptionResult, ScoredAnswer, ScoredBox, VQA_SCOPE, VqaRequest,
                             VqaResponse, VqaResult)

router = APIRouter(prefix="/v1", tags=["understanding"], dependencies=[Depends(require_api_key)])


async def _vqa(settings, backend, batcher: MicroBatcher, loader: ImageLoader, images: list[Source],
               questions: list[str], top_k: int) -> VqaResponse:
    started = time.perf_counter()
    check_image_count(settings, len(images))
    ids = await loader.run(lambda: [backend.encode_question(q) for q in questions])  # 422 before any image work
    loaded = await loader.load(images)
    items = [VqaBatchItem(im.pixels, q, top_k) for im, q in zip(loaded, ids)]
    decoded = time.perf_counter()
    timed = await batcher.submit_many(items)
    results = [
        VqaResult(width=im.size[0], height=im.size[1], question=q, answer=t.value.answer,
                  score=round(t.value.score, 4),
                  top_answers=[ScoredAnswer(answer=a, score=round(s, 4)) for a, s in t.value.top])
        for q, im, t in zip(questions, loaded, timed)
    ]
    return VqaResponse(model=backend.manifest.preset, results=results,
                       timings=timings(started, decoded, time.perf_counter(), timed))


def _max_len(backend, requested: int | None) -> int:
    limit = backend.caption_max_len
    if requested is not None and requested > limit:
        raise InvalidInput(f"max_len {requested} is over this model's limit of {limit} tokens", limit=limit)
    return requested or limit


def caption_phrases(phrases: list[GroundedPhrase] | None) -> list[CaptionPhrase] | None:
    """glipv2's grounded phrases as the API's (also the CLI's JSON)."""
    if phrases is None:
        return None
    return [CaptionPhrase(phrase=p.text, span=list(p.span), count=p.count,
                          box=p.boxes[0][0] if p.boxes else None, score=p.boxes[0][1] if p.boxes else None,
                          boxes=[ScoredBox(box=b, score=s) for b, s in p.boxes])
            for p in phrases]


async def _caption(settings, backend, batcher: MicroBatcher, loader: ImageLoader, images: list[Source],
                   max_len: int | None, beam_size: int, grounded: bool = False, checked: bool = True) -> CaptionResponse:
    started = time.perf_counter()
    check_image_count(settings, len(images))
    length = _max_len(backend, max_len)
    loaded = await loader.load(images)
    # Grounding: the detector on the same image, through the caption batcher (one detector
    # call for the batch's grounded captions), every candidate above GLIP's evaluation floor.
    ground = backend.manifest.postprocess_with(GROUNDING_SCORE_FLOOR) if grounded else None
    # Checked captions: the model's checked phrases grounded first, in the same batch call.
    check = backend.manifest.caption_check() if checked else None
    items = [CaptionBatchItem(im.pixels, beam_size, length, ground, im.letterbox, check) for im in loaded]
    decoded = time.perf_counter()
    timed = await batcher.submit_many(items)
    results = [CaptionResult(width=im.size[0], height=im.size[1], caption=t.value.text,
                             logprob=round(t.value.logprob, 4), num_tokens=t.value.num_tokens,
                             phrases=caption_phrases(t.value.phrases), checked=t.value.checked)
               for im, t in zip(loaded, timed)]
    return CaptionResponse(model=backend.manifest.preset, results=results,
                           timings=timings(started, decoded, time.perf_counter(), timed))


@router.post("/vqa", response_model=VqaResponse, responses=error_responses("empty or over-long question (256 tokens)"),
             summary="Answer a question about each image (JSON, base64 images)", description=VQA_SCOPE)
async def vqa(req: VqaRequest, settings: SettingsDep, backend: BackendDep, batcher: VqaBatcherDep,
              loader: LoaderDep) -> VqaResponse:
    return await within_deadline(settings, _vqa(settings, backend, batcher, loader, [source_of(it) for it in req.images],
                                                [it.question for it in req.images], req.top_k))


@router.post("/vqa/upload", response_model=VqaResponse,
             responses=error_responses("empty or over-long question (256 tokens)", upload=True),
             summary="Answer a question about one uploaded image (multipart/form-data)", description=VQA_SCOPE)
async def vqa_upload(
    settings: SettingsDep, backend: BackendDep, batcher: VqaBatcherDep, loader: LoaderDep,
    image: Annotated[UploadFile, File(description="JPEG, PNG or WebP file")],
    question: Annotated[str, Form(min_length=1, max_length=MAX_QUESTION_CHARS)],
    top_k: Annotated[int, Form(ge=1, le=MAX_TOP_ANSWERS)] = 5,
) -> VqaResponse:
    return await within_deadline(settings, _vqa(settings, backend, batcher, loader, [await read_upload(image)],
                                                [question], top_k))


@router.post("/caption", response_model=CaptionResponse, responses=error_responses("max_len over the model's limit"),
             summary="Caption each image (JSON, base64 images)")
async def caption(req: CaptionRequest, settings: SettingsDep, backend: BackendDep,
                  batcher: CaptionBatcherDep, loader: LoaderDep) -> CaptionResponse:
    return await within_deadline(settings, _caption(settings, backend, batcher, loader,
                                                    [source_of(it) for it in req.images], req.max_len, req.beam_size,
                                                    req.grounded, req.checked))


@router.post("/caption/upload", response_model=CaptionResponse,
             responses=error_responses("max_len over the model's limit", upload=True),
             summary="Caption one uploaded image (multipart/form-data)")
async def caption_upload(
    settings: SettingsDep, backend: BackendDep, batcher: CaptionBatcherDep, loader: LoaderDep,
    image: Annotated[UploadFile, File(description="JPEG, PNG or WebP file")],
    max_len: Annotated[int | None, Form(ge=1, le=255)] = None,
    beam_size: Annotated[int, Form(ge=1, le=MAX_BEAM)] = DEFAULT_BEAM,
    grounded: Annotated[bool, Form(description="also return each object phrase with its box and score")] = False,
    checked: Annotated[bool, Form(description=CHECKED)] = True,
) -> CaptionResponse:
    return await within_deadline(settings, _caption(settings, backend, batcher, loader, [await read_upload(image)],
                                                    max_len, beam_size, grounded, checked))
