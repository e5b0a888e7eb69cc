"""Images + questions -> answers, images -> captions, around any engine.

numpy only, like glipv2.pipeline: letterboxing, tokenizing, padding to token buckets,
answer ranking and caption decoding live here once; engines (PyTorch, ONNX Runtime,
Triton) only run the graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from glipv2.captioning import DEFAULT_MAX_LEN, CaptionEngine, beam_search
from glipv2.image import letterbox_batch
from glipv2.text import DEFAULT_BUCKETS, Tokenizer, encode_question, pad_ids

# (images uint8 [B,3,H,W], question ids [B,T], mask [B,T]) -> answer logits [B, num_answers]
VqaEngine = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class Answer:
    answer: str
    score: float  # sigmoid of the answer's logit (VQA is multi-label: scores need not sum to 1)
    top: list[tuple[str, float]]  # the best answers, best first


@dataclass
class Caption:
    text: str
    logprob: float  # summed token log-probability, end token included
    num_tokens: int


def rank_answers(logits: np.ndarray, answers: Sequence[str], top_k: int = 5) -> list[Answer]:
    """Answer logits [B, A] -> the best answer and the top_k of each row."""
    scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    out = []
    for row in scores:
        order = np.argsort(-row, kind="stable")[: max(1, top_k)]
        top = [(answers[i], float(row[i])) for i in order]
        out.append(Answer(top[0][0], top[0][1], top))
    return out


class VqaPipeline:
    def __init__(self, engine: VqaEngine, image_hw: tuple[int, int], answers: Sequence[str],
                 tokenizer: Tokenizer | None = None, buckets: Sequence[int] | None = DEFAULT_BUCKETS) -> None:
        if not answers:
            raise ValueError("the model has no answer vocabulary (it was trained without VQA)")
        self.engine, self.image_hw, self.answers = engine, tuple(image_hw), list(answers)
        self.tokenizer = tokenizer or Tokenizer()
        self.buckets = buckets

    def encode(self, questions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return pad_ids([encode_question(self.tokenizer, q) for q in questions], self.buckets, self.tokenizer.pad_id)

    def answer(self, images: Sequence[np.ndarray], questions: Sequence[str], top_k: int = 5) -> list[Answer]:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        ids, mask = self.encode(questions)
        pixels, _ = letterbox_batch(images, self.image_hw)
        return rank_answers(self.engine(pixels, ids, mask), self.answers, top_k)


class CaptionPipeline:
    def __init__(self, engine: CaptionEngine, image_hw: tuple[int, int], caption_tokens: Sequence[int],
                 max_positions: int, end_id: int, tokenizer: Tokenizer | None = None) -> None:
        if not caption_tokens:
            raise ValueError("the model has no caption decoder (it was trained without captions)")
        self.engine, self.image_hw = engine, tuple(image_hw)
        self.max_len = max_positions - 1  # position 0 is the start token
        self.tokenizer = tokenizer or Tokenizer()
        self.token_ids = np.asarray(caption_tokens, dtype=np.int64)
        self.end_index = list(caption_tokens).index(end_id)

    def caption(self, images: Sequence[np.ndarray], beam_size: int = 1,
                max_len: int | Sequence[int] = DEFAULT_MAX_LEN) -> list[Caption]:
        pixels, _ = letterbox_batch(images, self.image_hw)
        return self.caption_pixels(pixels, beam_size, max_len)

    def caption_pixels(self, pixels: np.ndarray, beam_size: int = 1,
                       max_len: int | Sequence[int] = DEFAULT_MAX_LEN) -> list[Caption]:
        """Letterboxed uint8 images [B, 3, H, W] -> captions."""
        if max(np.atleast_1d(max_len)) > self.max_len:
            raise ValueError(f"max_len must be at most {self.max_len} tokens for this model")
        hyps = beam_search(self.engine, pixels, self.end_index, beam_size, max_len)
        return [Caption(self.tokenizer.decode(self.token_ids[h.tokens]), h.logprob, len(h.tokens)) for h in hyps]
