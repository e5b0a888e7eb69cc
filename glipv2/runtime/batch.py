"""The one batch assembly: tokenized prompts + letterboxed images -> detections; questions
+ images -> answers; images -> captions. The gateway's backends, evaluation and the
export parity checks all run it, around any engine (ONNX Runtime, Triton, TensorRT,
PyTorch).

Text features are computed per prompt, each prompt encoded alone and unpadded, so they
never depend on the batch: a cached prompt (LRU keyed by token ids, cache_size > 0) gives
the same bits as a miss, and a prompt repeated inside one batch is encoded once. A batch
pads the features of prompts of different lengths to the smallest token bucket that fits
the longest, with the attention mask zero on padding, and runs the detector once; each
image is postprocessed with its own prompt's positive map and its own thresholds.
Questions share the cache and the padding and run the vqa graph once per batch; captions
are decoded by glipv2.captioning's beam search over the caption_start / caption_step
graphs, one lockstep decode per batch (per beam size). Checked captions first ground the
model's checked phrases on the batch's images (one detector call per prompt of them), and
the decode names only the phrases found (glipv2.captioning.CheckedRules).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from glipv2.boxes import Letterbox
from glipv2.captioning import CaptionEngine, CaptionLoop, Hypothesis
from glipv2.postprocess import Detections, PostprocessConfig, postprocess
from glipv2.text import (DEFAULT_BUCKETS, PromptTooLongError, TokenizedPrompt, Tokenizer, bucket_length, build_prompt,
                         tokenize)
from glipv2.understanding import Answer, Caption, CaptionPipeline, caption_prompt, grounded_phrases, rank_answers


class TaskUnavailable(RuntimeError):
    """The served model lacks the head a task needs (trained without VQA or captions)."""


class Engine(Protocol):
    """What runs the graphs (glipv2.runtime.graphs): arrays in, arrays out."""

    # caption_start / caption_step (or an engine running the whole loop, CaptionLoop), None
    # without a caption decoder
    captioner: CaptionEngine | CaptionLoop | None

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """int64 [B, T] x2 -> float32 token features [B, T, D]."""
        ...

    def detect(self, images: np.ndarray, features: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, ...]:
        """uint8 [B, 3, H, W], float32 [B, T, D], int64 [B, T] -> boxes [B, K, 4] (model-input
        pixels), logits [B, K, T], centerness [B, K]."""
        ...

    def vqa(self, images: np.ndarray, features: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """uint8 [B, 3, H, W], question features, mask -> answer logits [B, A]."""
        ...


class IdsEngine:
    """An engine given as calls on token ids, the text encoder inside them: detect
    (images, input_ids, attention_mask) -> detector outputs, answer (same inputs) -> answer
    logits. Its "features" are the token ids themselves, so the batch assembly pads ids
    with 0 ([PAD]) exactly where it pads features."""

    captioner = None

    def __init__(self, detect=None, answer=None) -> None:
        self._detect, self._answer = detect, answer

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return input_ids[..., None].astype(np.float32)

    def detect(self, images: np.ndarray, features: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, ...]:
        return self._detect(images, features[..., 0].astype(np.int64), attention_mask)

    def vqa(self, images: np.ndarray, features: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self._answer(images, features[..., 0].astype(np.int64), attention_mask)


def as_engine(engine) -> Engine:
    """An Engine as is; a plain callable (images, input_ids, mask) -> outputs as an IdsEngine."""
    return engine if hasattr(engine, "detect") else IdsEngine(detect=engine)


@dataclass
class BatchItem:
    """One image of a detection request, ready for the engine."""

    pixels: np.ndarray  # uint8 [3, H, W], letterboxed to the model input
    letterbox: Letterbox  # maps model-input boxes back to the original image
    prompt: TokenizedPrompt  # unpadded: input_ids [T], positive_map [P, T]
    postprocess: PostprocessConfig


@dataclass
class VqaBatchItem:
    pixels: np.ndarray  # uint8 [3, H, W], letterboxed
    question_ids: np.ndarray  # int64 [T], [CLS] ... [SEP]
    top_k: int


@dataclass
class CaptionBatchItem:
    pixels: np.ndarray  # uint8 [3, H, W], letterboxed
    beam_size: int
    max_len: int
    # Grounded captions: the caption's noun phrases are then grounded on the same image
    # (one detector call for the batch's grounded items) with these settings; letterbox
    # maps their boxes back to the original image.
    ground: PostprocessConfig | None = None
    letterbox: Letterbox | None = None
    # Checked captions: the model's checked phrases are grounded on the image first, with
    # these settings (score_threshold: the model's caption_check_threshold); the caption
    # names only those with a detection. None: no check.
    check: PostprocessConfig | None = None


# Training prompts hold an image's objects and about as many absent phrases (6 to 20
# phrases); the check grounds its phrases in prompts of at most this many so that they
# look like those. Measured on the demo model with 18 (README, "Detector-checked captions").
CHECK_PROMPT_PHRASES = 18


def check_prompts(tokenizer: Tokenizer, phrases: Sequence[str],
                  most: int = CHECK_PROMPT_PHRASES) -> list[tuple[list[int], TokenizedPrompt]]:
    """The checked phrases as the fewest prompts of at most `most` phrases (and the
    tokenizer's token limit), split evenly and in order: (phrase indices, prompt) each."""
    n = len(phrases)
    for count in range(-(-n // most), n + 1) if n else ():
        bounds = [n * k // count for k in range(count + 1)]  # sizes differ by at most one
        chunks = [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]
        try:
            return [(c, tokenize(tokenizer, build_prompt([phrases[i] for i in c]))) for c in chunks]
        except PromptTooLongError:
            continue
    return []


class FeatureCache:
    """Thread-safe LRU: token ids (bytes) -> token features [T, D], bounded by entry count
    and by bytes (keys + arrays): one 256-token prompt of a 384-wide encoder is 0.4 MB, so
    a count alone let 1024 long prompts hold about 400 MB."""

    def __init__(self, capacity: int, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.capacity = int(capacity)
        self.max_bytes = int(max_bytes)
        self._data: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> np.ndarray | None:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: bytes, value: np.ndarray) -> None:
        size = len(key) + value.nbytes
        if self.capacity <= 0 or size > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.nbytes -= len(key) + old.nbytes
            self._data[key] = value
            self.nbytes += size
            while len(self._data) > self.capacity or self.nbytes > self.max_bytes:
                k, v = self._data.popitem(last=False)
                self.nbytes -= len(k) + v.nbytes

    def __len__(self) -> int:
        return len(self._data)


class _CountedLoop:
    """A runner's engine that decodes whole captions itself (CaptionLoop), counted."""

    def __init__(self, runner: "BatchRunner") -> None:
        self.runner = runner

    def decode(self, images: np.ndarray, beam_size: int, max_len: Sequence[int],
               found: np.ndarray | None = None) -> list[Hypothesis]:
        self.runner.caption_steps += 1
        return self.runner.engine.captioner.decode(images, beam_size, max_len, found)


class BatchRunner:
    """Prompt features (cached), bucket padding, one engine call per batch, postprocessing,
    answer ranking and caption decoding around an Engine."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, image_hw: tuple[int, int],
                 buckets: Sequence[int] | None = DEFAULT_BUCKETS, answers: Sequence[str] | None = None,
                 caption_tokens: Sequence[int] | None = None, caption_max_len: int = 0, caption_end_id: int = 0,
                 caption_words: Sequence[str] = (), caption_checked_phrases: Sequence[str] = (), cache_size: int = 0,
                 cache_bytes: int = 64 * 1024 * 1024) -> None:
        """caption_max_len: the most tokens a caption may have (positions minus the start);
        caption_checked_phrases: ModelConfig.caption_checked_phrases (see CaptionBatchItem.check)."""
        self.engine = as_engine(engine)
        self.tokenizer = tokenizer
        self.image_hw = tuple(image_hw)
        self.buckets = tuple(sorted(buckets)) if buckets else None
        self.answers: list[str] = list(answers or [])
        self.cache = FeatureCache(cache_size, cache_bytes)
        self.text_encoder_calls = 0
        self.detector_calls = 0
        self.vqa_calls = 0
        self.caption_steps = 0
        self.caption_max_len = int(caption_max_len) if caption_tokens else 0
        # The shared decoding (beam search, shortlist ids -> text) with this runner as its
        # engine, so every start/step call (or whole-loop decode) is counted.
        loop = hasattr(getattr(self.engine, "captioner", None), "decode")
        self.captioner = CaptionPipeline(_CountedLoop(self) if loop else self, self.image_hw, caption_tokens,
                                         self.caption_max_len + 1, caption_end_id, tokenizer,
                                         caption_words, caption_checked_phrases) if caption_tokens else None
        phrases = list(caption_checked_phrases) if self.captioner is not None else []
        self.check_prompts = check_prompts(tokenizer, phrases)
        if phrases and not self.check_prompts:
            raise ValueError("a checked caption phrase does not fit the tokenizer's token limit alone")

    # prompts -------------------------------------------------------------------
    def features(self, input_ids: np.ndarray) -> np.ndarray:
        """Token features [T, D] of one prompt or question, from the cache or the text encoder."""
        key = input_ids.astype(np.int64).tobytes()
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        ids = np.ascontiguousarray(input_ids[None], dtype=np.int64)
        feats = np.asarray(self.engine.encode_text(ids, np.ones_like(ids))[0], dtype=np.float32)
        self.text_encoder_calls += 1
        self.cache.put(key, feats)
        return feats

    def padded_features(self, sequences: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Features of each id sequence, padded to the bucket of the longest, and the mask.
        Without a cache (evaluation), a sequence repeated in the batch is encoded once."""
        seen: dict[bytes, np.ndarray] = {}
        feats = []
        for ids in sequences:
            key = ids.astype(np.int64).tobytes()
            if key not in seen or self.cache.capacity > 0:  # with a cache, every lookup counts
                seen[key] = self.features(ids)
            feats.append(seen[key])
        longest = max(f.shape[0] for f in feats)
        tp = bucket_length(longest, self.buckets) if self.buckets else longest
        features = np.zeros((len(feats), tp, feats[0].shape[1]), dtype=np.float32)
        mask = np.zeros((len(feats), tp), dtype=np.int64)
        for i, f in enumerate(feats):
            features[i, : f.shape[0]] = f
            mask[i, : f.shape[0]] = 1
        return features, mask

    @staticmethod
    def _stack(pixels: Sequence[np.ndarray]) -> np.ndarray:
        return np.ascontiguousarray(np.stack(pixels))

    # batches -------------------------------------------------------------------
    def run_batch(self, items: Sequence[BatchItem]) -> list[Detections]:
        """Blocking: one detector call for the whole batch."""
        features, mask = self.padded_features([it.prompt.input_ids for it in items])
        boxes, logits, ctr = self.engine.detect(self._stack([it.pixels for it in items]), features, mask)
        self.detector_calls += 1
        # Each prompt's unpadded [P, T_i] map lines up with the padded logits (padding is
        # at the end), and each request keeps its own thresholds.
        return [
            postprocess(boxes[i], logits[i], ctr[i], it.prompt.positive_map, it.letterbox, it.postprocess)
            for i, it in enumerate(items)
        ]

    def run_vqa_batch(self, items: Sequence[VqaBatchItem]) -> list[Answer]:
        if not self.answers:
            raise TaskUnavailable("this model has no VQA head (its checkpoint was trained without VQA)")
        features, mask = self.padded_features([it.question_ids for it in items])
        logits = self.engine.vqa(self._stack([it.pixels for it in items]), features, mask)
        self.vqa_calls += 1
        return [rank_answers(logits[i:i + 1], self.answers, it.top_k)[0] for i, it in enumerate(items)]

    # the CaptionEngine protocol of glipv2.captioning (counted, then the engine's)
    def start(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        self.caption_steps += 1
        return self.engine.captioner.start(images)

    def step(self, tokens, past_k, past_v, cross_k, cross_v) -> tuple[np.ndarray, ...]:
        self.caption_steps += 1
        return self.engine.captioner.step(tokens, past_k, past_v, cross_k, cross_v)

    def run_caption_batch(self, items: Sequence[CaptionBatchItem]) -> list[Caption]:
        """One lockstep decode per beam size in the batch (usually one)."""
        if self.captioner is None:
            raise TaskUnavailable("this model has no caption decoder (its checkpoint was trained without captions)")
        groups: dict[int, list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            groups[it.beam_size].append(i)
        found = self._found_phrases(items)
        out: list[Caption | None] = [None] * len(items)
        for beam, idx in groups.items():
            pixels = self._stack([items[i].pixels for i in idx])
            captions = self.captioner.caption_pixels(pixels, beam, [items[i].max_len for i in idx],
                                                     None if found is None else found[idx])
            for i, caption in zip(idx, captions):
                caption.checked = found is not None and items[i].check is not None
                out[i] = caption
        self._ground_captions(items, out)
        return out

    def _found_phrases(self, items: Sequence[CaptionBatchItem]) -> np.ndarray | None:
        """bool [len(items), checked phrases]: which of them the detector finds on each
        checked item's image (one detector call per check prompt, the checked items as its
        batch); every phrase counts as found for an unchecked item. None when no item is
        checked or the model has no checked phrases."""
        checked = [i for i, it in enumerate(items) if it.check is not None]
        if not checked or not self.check_prompts:
            return None
        found = np.ones((len(items), len(self.captioner.check)), dtype=bool)
        found[checked] = False
        model_input = Letterbox(1.0, self.image_hw, self.image_hw)  # for an item without one: only scores are read
        for phrase_idx, prompt in self.check_prompts:
            dets = self.run_batch([BatchItem(items[i].pixels, items[i].letterbox or model_input, prompt, items[i].check)
                                   for i in checked])
            for i, det in zip(checked, dets):
                found[i, [phrase_idx[int(p)] for p in det.phrase_ids]] = True
        return found

    def _ground_captions(self, items: Sequence[CaptionBatchItem], captions: list[Caption]) -> None:
        """Grounded items: their captions' noun phrases as one prompt each, through the
        detector in one call, each phrase keeping its best boxes (GLIPv2's grounded
        captioning: the caption is the grounding prompt)."""
        todo = []
        for it, cap in zip(items, captions):
            if it.ground is None:
                continue
            if it.letterbox is None:
                raise ValueError("a grounded caption item needs its letterbox")
            prompt = caption_prompt(cap.text)
            cap.phrases = []
            if prompt is not None:
                todo.append((cap, prompt, BatchItem(it.pixels, it.letterbox, tokenize(self.tokenizer, prompt), it.ground)))
        if todo:
            for (cap, prompt, _), det in zip(todo, self.run_batch([t[2] for t in todo])):
                cap.phrases = grounded_phrases(cap.text, prompt, det)

    def stats(self) -> dict:
        return {
            "cache_hits": self.cache.hits,
            "cache_misses": self.cache.misses,
            "cache_size": len(self.cache),
            "cache_bytes": self.cache.nbytes,
            "text_encoder_calls": self.text_encoder_calls,
            "detector_calls": self.detector_calls,
            "vqa_calls": self.vqa_calls,
            "caption_decoder_calls": self.caption_steps,
        }
