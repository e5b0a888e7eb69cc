"""Answers and captions: answer ranking and the caption decoding pipeline, around any
engine (numpy only). The batch assembly that calls them is glipv2.runtime.batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from glipv2.boxes import box_iou
from glipv2.captioning import CaptionEngine, CaptionLoop, MentionRules, PhraseCheck, decode
from glipv2.image import letterbox_batch
from glipv2.phrases import ends_on_phrase, mention_count, noun_phrases, repeated_mention
from glipv2.postprocess import Detections
from glipv2.text import Prompt, Tokenizer, prompt_from_spans


@dataclass
class Answer:
    answer: str
    score: float  # sigmoid of the answer's logit (VQA is multi-label: scores need not sum to 1)
    top: list[tuple[str, float]]  # the best answers, best first


@dataclass
class GroundedPhrase:
    """An object phrase of a caption and where it is: `count` boxes for "two red squares",
    one otherwise; fewer when the detector finds fewer distinct candidates."""

    text: str
    span: tuple[int, int]  # [start, end) in the caption
    count: int
    boxes: list[tuple[list[float], float]]  # (xyxy original-image pixels, score), best first


@dataclass
class Caption:
    text: str
    logprob: float  # summed token log-probability, end token included
    num_tokens: int
    phrases: list[GroundedPhrase] | None = None  # grounded captions only
    checked: bool = False  # decoded with the detector check of the model's checked phrases


# Grounded captions keep every candidate above GLIP's evaluation threshold: the caption
# already says the object is there, the box says where and the score how sure.
GROUNDING_SCORE_FLOOR = 0.05


def caption_prompt(caption: str) -> Prompt | None:
    """The caption as a grounding prompt whose phrases are its noun phrases (as GLIPv2
    grounds a caption: the whole sentence is the text, each phrase a span of it); None
    when it has no noun phrase."""
    spans = noun_phrases(caption)
    return prompt_from_spans(caption, [[list(s)] for s in spans]) if spans else None


def grounded_phrases(caption: str, prompt: Prompt, det: Detections, same_iou: float = 0.5) -> list[GroundedPhrase]:
    """Each phrase of `caption_prompt(caption)` with its best boxes. A kind named again
    ("another red square") gets a box the earlier mention did not take (IoU < same_iou)."""
    taken: dict[str, list[np.ndarray]] = {}
    out = []
    for i, spans in enumerate(prompt.phrase_spans):
        start, end = spans[0]
        text = caption[start:end]
        key = " ".join(text.lower().split())
        count = mention_count(caption, (start, end))
        mine = taken.setdefault(key, [])
        boxes: list[tuple[list[float], float]] = []
        for j in np.flatnonzero(det.phrase_ids == i):  # detections are sorted by score
            if len(boxes) == count:
                break
            box = det.boxes[j]
            if mine and box_iou(box[None], np.stack(mine)).max() >= same_iou:
                continue
            mine.append(box)
            boxes.append(([round(float(v), 2) for v in box], round(float(det.scores[j]), 4)))
        out.append(GroundedPhrase(text, (start, end), count, boxes))
    return out


def rank_answers(logits: np.ndarray, answers: Sequence[str], top_k: int = 5) -> list[Answer]:
    """Answer logits [B, A] -> the best answer and the top_k of each row."""
    scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    out = []
    for row in scores:
        order = np.argsort(-row, kind="stable")[: max(1, top_k)]
        top = [(answers[i], float(row[i])) for i in order]
        out.append(Answer(top[0][0], top[0][1], top))
    return out


def caption_pieces(tokenizer: Tokenizer, caption_tokens: Sequence[int]) -> list[str]:
    """The decoder shortlist's WordPiece strings, what MentionRules reads."""
    return [tokenizer.id_to_token(int(i)) or "" for i in caption_tokens]


class CaptionPipeline:
    def __init__(self, engine: CaptionEngine | CaptionLoop, image_hw: tuple[int, int], caption_tokens: Sequence[int],
                 max_positions: int, end_id: int, tokenizer: Tokenizer | None = None, words: Sequence[str] = (),
                 checked_phrases: Sequence[str] = ()) -> None:
        """words: the whole words captions may use (ModelConfig.caption_words; empty: any);
        checked_phrases: the phrases a caption may name only where the detector found them
        (ModelConfig.caption_checked_phrases; the caller grounds them: see caption_pixels)."""
        if not caption_tokens:
            raise ValueError("the model has no caption decoder (it was trained without captions)")
        self.engine, self.image_hw = engine, tuple(image_hw)
        self.max_len = max_positions - 1  # position 0 is the start token
        self.tokenizer = tokenizer or Tokenizer()
        self.token_ids = np.asarray(caption_tokens, dtype=np.int64)
        self.end_index = list(caption_tokens).index(end_id)
        # No object named twice, no caption ending inside a phrase or a word (glipv2.captioning).
        self.rules = MentionRules(caption_pieces(self.tokenizer, caption_tokens), repeated_mention, ends_on_phrase,
                                  words)
        self.check = PhraseCheck(checked_phrases) if checked_phrases else None

    def caption(self, images: Sequence[np.ndarray], beam_size: int = 1,
                max_len: int | Sequence[int] | None = None) -> list[Caption]:
        pixels, _ = letterbox_batch(images, self.image_hw)
        return self.caption_pixels(pixels, beam_size, max_len)

    def caption_pixels(self, pixels: np.ndarray, beam_size: int = 1, max_len: int | Sequence[int] | None = None,
                       found: np.ndarray | None = None) -> list[Caption]:
        """Letterboxed uint8 images [B, 3, H, W] -> captions; max_len defaults to the
        model's limit (longer than any training caption). found: bool [B, C], which of the
        C checked phrases the detector found on each image (None: no check)."""
        max_len = self.max_len if max_len is None else max_len
        if max(np.atleast_1d(max_len)) > self.max_len:
            raise ValueError(f"max_len must be at most {self.max_len} tokens for this model")
        if found is not None and self.check is None:
            raise ValueError("this model has no checked phrases")
        hyps = decode(self.engine, pixels, self.end_index, beam_size, max_len, rules=self.rules, check=self.check,
                      found=found)
        return [Caption(self.tokenizer.decode(self.token_ids[h.tokens]), h.logprob, len(h.tokens)) for h in hyps]
