"""Answers and captions: answer ranking and the caption decoding pipeline, around any
engine (numpy only). The batch assembly that calls them is glipv2.runtime.batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from glipv2.captioning import DEFAULT_MAX_LEN, CaptionEngine, CaptionLoop, decode
from glipv2.image import letterbox_batch
from glipv2.text import Tokenizer


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


class CaptionPipeline:
    def __init__(self, engine: CaptionEngine | CaptionLoop, image_hw: tuple[int, int], caption_tokens: Sequence[int],
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
        hyps = decode(self.engine, pixels, self.end_index, beam_size, max_len)
        return [Caption(self.tokenizer.decode(self.token_ids[h.tokens]), h.logprob, len(h.tokens)) for h in hyps]
