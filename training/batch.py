"""Collate GroundingSamples of any prompts into one padded training batch."""

from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from glipv2.image import letterbox
from glipv2.modeling.vqa import EXTREMES
from glipv2.text import Tokenizer, encode_question, pad_batch, pad_ids, prompt_from_spans, tokenize
from training.data import GroundingSample
from training.text_metrics import answer_scores


@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B, 3, H, W] letterboxed RGB
    input_ids: torch.Tensor  # [B, T] (with [MASK]s where MLM masked them)
    attention_mask: torch.Tensor  # [B, T]
    positive_map: torch.Tensor  # float [B, P, T] binary
    phrase_keys: torch.Tensor  # int64 [B, P]: phrase text hash, 0 for padding phrases
    boxes: list[torch.Tensor]  # per image [N, 4] xyxy model-input pixels
    box_phrase: list[torch.Tensor]  # per image [N] phrase index
    mlm_labels: torch.Tensor | None  # [B, T] original id where masked, -100 elsewhere
    step_seed: int
    # Understanding tasks (None when the model has no such head or the data no such labels).
    question_ids: torch.Tensor | None = None  # [B, Tq]
    question_mask: torch.Tensor | None = None  # [B, Tq]
    answer_scores: torch.Tensor | None = None  # float [B, num_answers], VQA v2 soft scores
    caption_in: torch.Tensor | None = None  # [B, L] decoder shortlist indices, start first
    caption_out: torch.Tensor | None = None  # [B, L] next-token targets, -100 = padding
    objects: list[torch.Tensor] | None = None  # per image [M, 4] xyxy model-input pixels: every object
    question_extremes: torch.Tensor | None = None  # int64 [B]: index in EXTREMES of the answering object, -1 none

    def to(self, device: torch.device | str) -> "Batch":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Batch(
            self.images.to(device), self.input_ids.to(device), self.attention_mask.to(device),
            self.positive_map.to(device), self.phrase_keys.to(device),
            [b.to(device) for b in self.boxes], [p.to(device) for p in self.box_phrase],
            move(self.mlm_labels), self.step_seed, move(self.question_ids), move(self.question_mask),
            move(self.answer_scores), move(self.caption_in), move(self.caption_out),
            None if self.objects is None else [o.to(device) for o in self.objects],
            move(self.question_extremes),
        )


def phrase_key(text: str) -> int:
    """Stable across processes (unlike hash()), never 0 (0 marks padding)."""
    return (zlib.crc32(" ".join(text.lower().split()).encode()) & 0x7FFFFFFF) or 1


class Collator:
    def __init__(self, tokenizer: Tokenizer, image_hw: tuple[int, int], mlm_fraction: float = 0.0,
                 mlm_probability: float = 0.15, answers: Sequence[str] = (),
                 caption_tokens: Sequence[int] = (), caption_max_len: int = 40) -> None:
        self.tokenizer = tokenizer
        self.image_hw = image_hw
        self.mlm_fraction = mlm_fraction
        self.mlm_probability = mlm_probability
        self.answer_index = {a: i for i, a in enumerate(answers)}
        self.caption_index = {int(t): i for i, t in enumerate(caption_tokens)}
        self.caption_max_len = caption_max_len

    def __call__(self, samples: Sequence[GroundingSample], step_seed: int = 0) -> Batch:
        images, boxes, box_phrase, tokenized, objects = [], [], [], [], []
        for s in samples:
            img, lb = letterbox(s.image, self.image_hw)
            images.append(img)
            boxes.append(torch.from_numpy(lb.to_input(s.boxes).reshape(-1, 4)))
            if s.objects is not None:
                objects.append(torch.from_numpy(lb.to_input(s.objects).reshape(-1, 4)))
            box_phrase.append(torch.from_numpy(np.asarray(s.box_phrase, dtype=np.int64).reshape(-1)))
            tokenized.append(tokenize(self.tokenizer, prompt_from_spans(s.caption, s.phrase_spans)))
        tb = pad_batch(tokenized, buckets=None, pad_id=self.tokenizer.pad_id)
        keys = np.zeros(tb.phrase_mask.shape, dtype=np.int64)
        for i, tp in enumerate(tokenized):
            keys[i, : tp.num_phrases] = [phrase_key(p) for p in tp.prompt.phrases]
        input_ids = torch.from_numpy(tb.input_ids)
        mlm_labels = None
        if self.mlm_fraction > 0:
            input_ids, mlm_labels = self._mask(input_ids, torch.from_numpy(tb.attention_mask), step_seed)
        extra: dict[str, object] = {}
        if self.answer_index and all(s.question is not None for s in samples):
            extra.update(self._questions(samples))
            if len(objects) == len(samples):
                extra["objects"] = objects
        if self.caption_index and all(s.captions for s in samples):
            extra.update(self._captions(samples, step_seed))
        return Batch(
            images=torch.from_numpy(np.stack(images)),
            input_ids=input_ids,
            attention_mask=torch.from_numpy(tb.attention_mask),
            positive_map=torch.from_numpy(tb.positive_map),
            phrase_keys=torch.from_numpy(keys),
            boxes=boxes,
            box_phrase=box_phrase,
            mlm_labels=mlm_labels,
            step_seed=step_seed,
            **extra,
        )

    def _questions(self, samples: Sequence[GroundingSample]) -> dict[str, torch.Tensor]:
        ids, mask = pad_ids([encode_question(self.tokenizer, s.question) for s in samples], None, self.tokenizer.pad_id)
        scores = np.zeros((len(samples), len(self.answer_index)), dtype=np.float32)
        for i, s in enumerate(samples):
            for answer, score in answer_scores(s.answers or []).items():
                if answer in self.answer_index:  # answers outside the vocabulary score 0 everywhere
                    scores[i, self.answer_index[answer]] = score
        extremes = [-1 if s.question_extreme is None else EXTREMES.index(s.question_extreme) for s in samples]
        return {"question_ids": torch.from_numpy(ids), "question_mask": torch.from_numpy(mask),
                "answer_scores": torch.from_numpy(scores), "question_extremes": torch.tensor(extremes)}

    def _captions(self, samples: Sequence[GroundingSample], seed: int) -> dict[str, torch.Tensor]:
        """One reference per image, chosen by the step seed; WordPiece ids -> shortlist indices."""
        rng = np.random.default_rng([seed, 11])
        unk = self.caption_index.get(self.tokenizer.token_to_id("[UNK]"), 0)
        rows = []
        for s in samples:
            text = s.captions[int(rng.integers(len(s.captions)))]
            ids = self.tokenizer.encode(text).ids[: self.caption_max_len]
            rows.append([self.caption_index.get(int(i), unk) for i in ids])
        n = max(len(r) for r in rows) - 1
        caption_in = np.zeros((len(rows), n), dtype=np.int64)
        caption_out = np.full((len(rows), n), -100, dtype=np.int64)
        for i, r in enumerate(rows):
            caption_in[i, : len(r) - 1] = r[:-1]
            caption_out[i, : len(r) - 1] = r[1:]
        return {"caption_in": torch.from_numpy(caption_in), "caption_out": torch.from_numpy(caption_out)}

    def _mask(self, ids: torch.Tensor, mask: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT masking (80% [MASK], 10% random word, 10% kept) on a share of the prompts."""
        g = torch.Generator().manual_seed(seed)
        tok = self.tokenizer
        # Separators are never masked: predicting "." teaches nothing.
        special = (ids == tok.cls_id) | (ids == tok.sep_id) | (mask == 0) | (ids == tok.token_to_id("."))
        chosen_rows = torch.rand(ids.shape[0], generator=g) < self.mlm_fraction
        chosen = (torch.rand(ids.shape, generator=g) < self.mlm_probability) & ~special & chosen_rows[:, None]
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        roll = torch.rand(ids.shape, generator=g)
        out = ids.clone()
        out[chosen & (roll < 0.8)] = tok.mask_id
        rand_words = torch.randint(1000, tok.vocab_size, ids.shape, generator=g)
        swap = chosen & (roll >= 0.8) & (roll < 0.9)
        out[swap] = rand_words[swap]
        return out, labels


class TextFeatureCache:
    """LRU of frozen text-encoder outputs keyed by token ids.

    Each prompt is encoded on its own (unpadded), so its features do not depend on
    which other prompts shared the batch: a cache hit and a miss give identical bits,
    which keeps resumed runs exactly equal to uninterrupted ones.
    """

    def __init__(self, encode, max_entries: int = 20000) -> None:
        self.encode = encode
        self.max_entries = max_entries
        self.store: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 keep: Sequence[bool] | None = None) -> torch.Tensor:
        """keep[i] False: encode row i but do not store it (MLM-masked prompts never repeat)."""
        rows = []
        lengths = attention_mask.sum(1).tolist()
        keep = [True] * len(lengths) if keep is None else list(keep)
        for ids, n, store in zip(input_ids, lengths, keep):
            key = tuple(ids[: int(n)].tolist())
            feats = self.store.get(key)
            if feats is None:
                self.misses += 1
                x = ids[None, : int(n)]
                feats = self.encode(x, torch.ones_like(x))[0]
                if self.max_entries and store:
                    self.store[key] = feats
                    if len(self.store) > self.max_entries:
                        self.store.popitem(last=False)
            else:
                self.hits += 1
                self.store.move_to_end(key)
            rows.append(feats)
        t = input_ids.shape[1]
        out = rows[0].new_zeros(len(rows), t, rows[0].shape[-1])
        for i, f in enumerate(rows):
            out[i, : f.shape[0]] = f
        return out
