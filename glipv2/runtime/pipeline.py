"""Images + prompts -> detections, images + questions -> answers, around any engine.

numpy only: letterbox and tokenize here, then the gateway's own batch assembly
(glipv2.runtime.batch.BatchRunner), so evaluation and the export parity checks run the
path the gateway serves. An engine only runs the graphs (glipv2.runtime.batch.Engine).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from glipv2.image import letterbox
from glipv2.postprocess import Detections, PostprocessConfig
from glipv2.runtime.batch import BatchItem, BatchRunner, Engine, VqaBatchItem
from glipv2.text import DEFAULT_BUCKETS, Prompt, Tokenizer, encode_question, tokenize
from glipv2.understanding import Answer


class DetectionPipeline:
    def __init__(
        self,
        engine: Engine,
        image_hw: tuple[int, int],
        tokenizer: Tokenizer | None = None,
        postprocess: PostprocessConfig = PostprocessConfig(),
        buckets: Sequence[int] | None = DEFAULT_BUCKETS,
    ) -> None:
        self.engine = engine
        self.image_hw = tuple(image_hw)
        self.tokenizer = tokenizer or Tokenizer()
        self.postprocess = postprocess
        self.buckets = buckets
        # No feature cache: a model under training changes between calls.
        self.runner = BatchRunner(engine, self.tokenizer, self.image_hw, buckets)

    def predict(self, images: Sequence[np.ndarray], prompts: Sequence[Prompt]) -> list[Detections]:
        """One prompt per image (prompts may differ in length and phrase count)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not images:
            return []
        items = []
        for image, prompt in zip(images, prompts):
            pixels, lb = letterbox(image, self.image_hw)
            items.append(BatchItem(pixels, lb, tokenize(self.tokenizer, prompt, self.postprocess.phrase_tokens),
                                   self.postprocess))
        return self.runner.run_batch(items)


class VqaPipeline:
    def __init__(self, engine: Engine, image_hw: tuple[int, int], answers: Sequence[str],
                 tokenizer: Tokenizer | None = None, buckets: Sequence[int] | None = DEFAULT_BUCKETS) -> None:
        if not answers:
            raise ValueError("the model has no answer vocabulary (it was trained without VQA)")
        self.engine, self.image_hw, self.answers = engine, tuple(image_hw), list(answers)
        self.tokenizer = tokenizer or Tokenizer()
        self.runner = BatchRunner(engine, self.tokenizer, self.image_hw, buckets, answers=self.answers)

    def answer(self, images: Sequence[np.ndarray], questions: Sequence[str], top_k: int = 5) -> list[Answer]:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        if not images:
            return []
        items = [VqaBatchItem(letterbox(im, self.image_hw)[0], encode_question(self.tokenizer, q), top_k)
                 for im, q in zip(images, questions)]
        return self.runner.run_vqa_batch(items)
