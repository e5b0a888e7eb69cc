"""Request and response models of the HTTP API (pydantic), with their limits.

Boxes are always xyxy in pixels of the original image as sent (after its EXIF
orientation is applied): [x0, y0, x1, y1], x to the right, y down, x1 > x0, y1 > y0.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from glipv2.captioning import DEFAULT_BEAM, MAX_BEAM

# A prompt of more than 256 tokens is refused after tokenization (422 naming the limit);
# these character limits only bound the work spent before that.
MAX_PROMPT_CHARS = 4096
MAX_PHRASES = 256
MAX_PHRASE_CHARS = 256

Phrase = Annotated[str, Field(min_length=1, max_length=MAX_PHRASE_CHARS)]
PromptText = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]


_URL_DESCRIPTION = (
    "instead of `image`: an http(s) URL the gateway fetches. Only when GLIPV2_URL_ALLOWLIST is set "
    "(422 'fetching image URLs is disabled' otherwise); a host not on the list -> 403"
)
MAX_URL_CHARS = 2048


# An image field's OpenAPI format: base64 of a JPEG, PNG or WebP file. Fuzzers register a
# strategy for it (tests/test_service_fuzz.py) so that generated requests carry real images.
IMAGE_FORMAT = "base64-image"
# A real 24x16 PNG (two coloured squares), the schema's example: a request copied from
# /docs reaches the model.
EXAMPLE_IMAGE = ("iVBORw0KGgoAAAANSUhEUgAAABgAAAAQCAIAAACDRijCAAAAQElEQVR42mN8/fo1AzUAEwOVANUMYoFQH42NsUrznz1LmkEEgXHgR1"
                 "xSZ9fzD8owGjWI6OgnPr3Q3EWMwzfTAgAPIA1QrUvDIwAAAABJRU5ErkJggg==")


def _one_of_image_url(schema: dict) -> None:
    """The schema says what the validator enforces: exactly one of 'image' and 'url' (and
    neither may be null: their None default only stands for 'left out')."""
    for name in ("image", "url"):
        schema.get("properties", {}).get(name, {}).pop("default", None)
    schema["oneOf"] = [{"required": ["image"], "not": {"required": ["url"]}},
                       {"required": ["url"], "not": {"required": ["image"]}}]


class _ImageSource(BaseModel):
    """Exactly one of `image` (base64) and `url`. Both are typed `str` with a default of
    None: leaving one out is how a request picks the other, and an explicit null is refused
    (422), as the schema says."""

    # strict: JSON types as the schema states them (pydantic's lax mode took true for 1 and
    # "5" for 5, values the schema refuses; `make fuzz` found it)
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_one_of_image_url)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.image is None) == (self.url is None):
            raise ValueError("give exactly one of 'image' (base64) and 'url'")
        return self


def _image_field(description: str = "JPEG, PNG or WebP, base64 or a data URL"):
    return Field(None, description=description, min_length=1, json_schema_extra={"format": IMAGE_FORMAT},
                 examples=[EXAMPLE_IMAGE])


def _url_field():
    return Field(None, min_length=1, max_length=MAX_URL_CHARS, description=_URL_DESCRIPTION)


class DetectItem(_ImageSource):
    image: str = _image_field("JPEG, PNG or WebP, base64 (standard alphabet) or a data URL "
                              "('data:image/png;base64,...')")
    url: str = _url_field()
    prompt: PromptText | Annotated[list[Phrase], Field(min_length=1, max_length=MAX_PHRASES)] = Field(
        description="what to find: 'red circle. star.' (phrases separated by '.') or a list of "
        "phrases ['red circle', 'star']; at most 256 tokens",
        examples=["red circle. star.", ["red circle", "star"]],
    )


class DetectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # see _ImageSource

    images: list[DetectItem] = Field(
        min_length=1, description="one or more images, each with its own prompt; batched together"
    )
    score_threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="keep detections scoring above this (default: the model's, GET /v1/models "
                                    "postprocess.score_threshold: 0.45 for the demo model, its best-F1 threshold)"
    )
    max_detections: int | None = Field(
        None, ge=1, le=1000, description="at most this many detections per image (default 100)"
    )


Span = Annotated[list[int], Field(min_length=2, max_length=2, description="[start, end) character offsets")]


class GroundItem(_ImageSource):
    image: str = _image_field()
    url: str = _url_field()
    caption: PromptText = Field(description="free text, e.g. 'a red circle left of a blue star'")
    phrases: list[Span | Annotated[list[Span], Field(min_length=1, max_length=16)]] | None = Field(
        None, min_length=1, max_length=MAX_PHRASES,
        description="the phrases to ground, as character spans of the caption: one [start, end) pair "
        "per phrase, or a list of pairs for a phrase in several pieces. Left out: the caption's noun "
        "phrases are found automatically (glipv2.phrases; 422 when it has none)",
        examples=[[[2, 12], [[29, 33]]]],
    )


class GroundRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # see _ImageSource

    images: list[GroundItem] = Field(min_length=1, description="one or more images, each with its caption")
    score_threshold: float | None = Field(None, ge=0.0, le=1.0)
    max_detections: int | None = Field(None, ge=1, le=1000)


class Detection(BaseModel):
    box: list[float] = Field(
        min_length=4, max_length=4,
        description="[x0, y0, x1, y1] in pixels of the original image (EXIF orientation applied)",
    )
    score: float = Field(ge=0.0, le=1.0)
    phrase: str = Field(description="the prompt phrase this box was found for")
    phrase_index: int = Field(ge=0, description="index of the phrase in the prompt")


class ImageResult(BaseModel):
    width: int = Field(description="original image width in pixels")
    height: int = Field(description="original image height in pixels")
    prompt: str = Field(description="the prompt as the model read it ('red circle. star.')")
    phrases: list[str]
    detections: list[Detection] = Field(description="highest score first")


class GroundImageResult(ImageResult):
    phrase_spans: list[list[list[int]]] = Field(
        description="for each phrase (same order as `phrases`), its [start, end) character spans in the caption"
    )
    phrases_source: Literal["given", "automatic"] = Field(
        description="'given': the request's spans; 'automatic': noun phrases found in the caption"
    )


class Timings(BaseModel):
    decode_ms: float = Field(description="base64 + image decoding + letterbox")
    queue_ms: float = Field(description="longest wait in the batcher over the request's images")
    inference_ms: float = Field(description="longest engine call (text encoder + detector + postprocess)")
    total_ms: float


class DetectResponse(BaseModel):
    model: str
    results: list[ImageResult]
    timings: Timings


class GroundResponse(BaseModel):
    model: str
    results: list[GroundImageResult]
    timings: Timings


MAX_QUESTION_CHARS = 2048
MAX_TOP_ANSWERS = 20


class VqaItem(_ImageSource):
    image: str = _image_field()
    url: str = _url_field()
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS,
                          description="a question about the image; at most 256 tokens",
                          examples=["what color is the star?"])


class VqaRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # see _ImageSource

    images: list[VqaItem] = Field(min_length=1, description="one or more images, each with its question; batched")
    top_k: int = Field(5, ge=1, le=MAX_TOP_ANSWERS, description="how many ranked answers to return")


class ScoredAnswer(BaseModel):
    answer: str
    score: float = Field(ge=0.0, le=1.0, description="sigmoid score (answers are scored independently)")


VQA_SCOPE = (
    "What it can answer: the question kinds it was trained on. The demo model knows the shapes world's "
    "questions: 'what color is the star?', 'how many circles are there?' (0-6), 'is there a red square?', "
    "'what shape is left of the blue circle?', 'what color is the largest object?'. What it cannot: anything "
    "else (other objects, 'is there a dog?'; other phrasings, 'how many shapes are there?'). Every question "
    "gets the best answer of the answer vocabulary (GET /v1/models answer_vocabulary), and the score says how "
    "sure the model is of that answer among its answers, not that the question is one it can answer: an "
    "out-of-domain question can get a wrong answer with a high score.")


class VqaResult(BaseModel):
    width: int
    height: int
    question: str
    answer: str = Field(description="the best answer of the model's answer vocabulary. " + VQA_SCOPE)
    score: float = Field(ge=0.0, le=1.0, description="the answer's sigmoid score: confidence among the "
                         "vocabulary's answers, not that the question is answerable (see answer)")
    top_answers: list[ScoredAnswer] = Field(description="best first")


class VqaResponse(BaseModel):
    model: str
    results: list[VqaResult]
    timings: Timings


CHECKED = ("name a phrase of the model's checked list (e.g. 'red circle'; /v1/models shows the list) only where "
           "the detector finds it on the image, scored at least the model's check threshold: the caption then names "
           "the object the detector sees instead of one it does not. Costs one detector call per 18 checked phrases "
           "per batch; no effect for a model without checked phrases")


class CaptionItem(_ImageSource):
    image: str = _image_field()
    url: str = _url_field()


class CaptionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # see _ImageSource

    images: list[CaptionItem] = Field(min_length=1, description="one or more images; decoded as one batch")
    max_len: int | None = Field(None, ge=1, le=255,
                                description="at most this many tokens (default: the model's limit, 39 for the demo "
                                "model, above its longest training caption); a caption the limit would cut inside a "
                                "phrase ends after its last complete phrase instead")
    beam_size: int = Field(DEFAULT_BEAM, ge=1, le=MAX_BEAM,
                           description="hypotheses kept while decoding; 1 = greedy (fastest), more names the "
                           "image's objects more completely and more correctly")
    grounded: bool = Field(False, description="also ground the caption: each of its object (noun) phrases with "
                           "its box and score, found by the detector on the same image with the caption as prompt")
    checked: bool = Field(True, description=CHECKED)


class ScoredBox(BaseModel):
    box: list[float] = Field(min_length=4, max_length=4, description="[x0, y0, x1, y1] in pixels of the original image")
    score: float = Field(ge=0.0, le=1.0)


class CaptionPhrase(BaseModel):
    phrase: str = Field(description="an object phrase of the caption, e.g. 'red square'")
    span: list[int] = Field(min_length=2, max_length=2, description="its [start, end) characters in the caption")
    count: int = Field(ge=1, description="how many objects it names ('two red squares': 2)")
    box: list[float] | None = Field(description="its best box, [x0, y0, x1, y1] original-image pixels; null when "
                                    "the detector found no candidate")
    score: float | None = Field(description="the best box's phrase score (null with no box)")
    boxes: list[ScoredBox] = Field(description="up to `count` distinct boxes, best first; a phrase named again "
                                   "('another red square') gets a box the earlier mention did not take")


class CaptionResult(BaseModel):
    width: int
    height: int
    caption: str
    logprob: float = Field(description="summed token log-probability of the caption")
    num_tokens: int
    phrases: list[CaptionPhrase] | None = Field(None, description="grounded captions only: the caption's object "
                                                "phrases in caption order, each with its box and score")
    checked: bool = Field(description="whether the detector checked the caption's phrases (asked for, and the model "
                          "has checked phrases)")


class CaptionResponse(BaseModel):
    model: str
    results: list[CaptionResult]
    timings: Timings


class ModelInfo(BaseModel):
    name: str
    inputs: dict[str, dict]
    outputs: dict[str, dict]


class ModelsResponse(BaseModel):
    format: str
    flavour: str
    preset: str
    checkpoint: dict
    backend: str
    device: str = Field(description="where the models run: 'cpu' or 'cuda' (embedded: what ONNX Runtime's "
                                    "sessions report; triton: the repository flavour's instance kind)")
    providers: list[str] | None = Field(None, description="embedded backend: ONNX Runtime's execution providers")
    image_hw: list[int]
    max_tokens: int
    token_buckets: list[int]
    top_k: int
    postprocess: dict
    tasks: list[str] = Field(description="what this model serves: detect, vqa, caption")
    answer_vocabulary: list[str] | None = None
    caption: dict | None = Field(None, description="the caption decoder's settings (manifest.caption): its token "
                                 "limit, words, checked_phrases and check_threshold; null without one")
    models: list[ModelInfo]


class HealthResponse(BaseModel):
    status: str
    detail: str | None = None


class ErrorResponse(BaseModel):
    detail: str | list
    limit: int | float | None = None
