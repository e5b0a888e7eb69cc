"""What every backend does: tokenized prompts + letterboxed images -> detections; questions
+ images -> answers; images -> captions.

EngineBackend holds what the embedded and Triton backends share. Text features are
cached per prompt (LRU keyed by token ids): every prompt is encoded alone and unpadded,
so a cached prompt skips the text encoder and a hit gives the same bits as a miss (the
features never depend on the batch). A batch pads the features of prompts of different
lengths to the smallest token bucket that fits the longest, with the attention mask zero
on padding, and runs the detector once. Questions share the cache and the padding and run
the vqa graph once per batch; captions are decoded by glipv2.captioning's beam search over
the caption_start / caption_step graphs, one lockstep decode per batch (per beam size).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from glipv2.boxes import Letterbox
from glipv2.postprocess import Detections, PostprocessConfig, postprocess
from glipv2.text import Prompt, TokenizedPrompt, Tokenizer, bucket_length, build_prompt, encode_question, tokenize
from glipv2.understanding import Answer, Caption, CaptionPipeline, rank_answers

MANIFEST_FORMAT = "glipv2-serve-repository/1"


def load_manifest(repository: Path) -> dict:
    """model_repository/manifest.json (written by export.repository), format-checked."""
    path = Path(repository) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; run `make export` to render the model repository")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    return manifest


@dataclass
class BatchItem:
    """One image of a request, ready for the engine."""

    pixels: np.ndarray  # uint8 [3, H, W], letterboxed to the model input
    letterbox: Letterbox  # maps model-input boxes back to the original image
    prompt: TokenizedPrompt  # unpadded: input_ids [T], positive_map [P, T]
    postprocess: PostprocessConfig


@dataclass
class VqaItem:
    pixels: np.ndarray  # uint8 [3, H, W], letterboxed
    question_ids: np.ndarray  # int64 [T], [CLS] ... [SEP]
    top_k: int


@dataclass
class CaptionItem:
    pixels: np.ndarray  # uint8 [3, H, W], letterboxed
    beam_size: int
    max_len: int


class TaskUnavailable(RuntimeError):
    """The served model lacks the head a task needs (trained without VQA or captions)."""


class Backend(Protocol):
    name: str
    manifest: dict
    image_hw: tuple[int, int]
    device: str  # where the models run: "cpu" or "cuda"
    providers: list[str] | None  # ONNX Runtime's providers of the embedded backend's sessions

    def tokenize(self, prompt: str | list[str] | Prompt) -> TokenizedPrompt: ...

    def run_batch(self, items: list[BatchItem]) -> list[Detections]:
        """Blocking: one engine call for the whole batch (called in a worker thread)."""
        ...

    def run_vqa_batch(self, items: list[VqaItem]) -> list[Answer]: ...

    def run_caption_batch(self, items: list[CaptionItem]) -> list[Caption]: ...

    def ping(self) -> None:
        """Blocking: raise if the backend cannot answer."""
        ...

    def stats(self) -> dict: ...

    def close(self) -> None: ...


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


class EngineBackend:
    """Tokenizer, prompt-feature cache, bucket padding, postprocessing and caption decoding
    around the engine calls that subclasses provide: _encode_text, _detect, _vqa,
    _caption_start and _caption_step."""

    name = "engine"
    device = "cpu"
    providers: list[str] | None = None

    def __init__(self, repository: Path, cache_size: int = 1024, cache_bytes: int = 64 * 1024 * 1024) -> None:
        self.repository = Path(repository)
        self.manifest = load_manifest(self.repository)
        self.image_hw = tuple(self.manifest["image"]["hw"])
        self.max_tokens = int(self.manifest["max_tokens"])
        self.buckets = tuple(sorted(self.manifest["token_buckets"]))
        self.tokenizer = Tokenizer(self.repository / self.manifest["tokenizer"], max_tokens=self.max_tokens)
        self.cache = FeatureCache(cache_size, cache_bytes)
        self.text_encoder_calls = 0
        self.detector_calls = 0
        self.vqa_calls = 0
        self.caption_steps = 0
        self.answers: list[str] = list(self.manifest.get("answer_vocabulary") or [])
        caption = self.manifest.get("caption") or {}
        self.caption_max_len = int(caption.get("max_len", 0))
        # The shared decoding (beam search, shortlist ids -> text) with this backend as its engine.
        self.captioner = CaptionPipeline(self, self.image_hw, caption["tokens"], self.caption_max_len + 1,
                                         caption["end_id"], self.tokenizer) if caption else None

    @property
    def tasks(self) -> list[str]:
        """What this model serves: detect (always), vqa, caption."""
        return ["detect"] + ["vqa"] * bool(self.answers) + ["caption"] * (self.captioner is not None)

    def models(self) -> list[str]:
        """The graphs the backend calls (those of the manifest)."""
        return list(self.manifest["models"])

    # engine calls ------------------------------------------------------------
    def _encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """int64 [B, T] x2 -> float32 token features [B, T, D]."""
        raise NotImplementedError

    def _detect(self, images: np.ndarray, features: np.ndarray, attention_mask: np.ndarray):
        """uint8 [B, 3, H, W], float32 [B, T, D], int64 [B, T] -> boxes [B, K, 4], logits [B, K, T], centerness [B, K]."""
        raise NotImplementedError

    def _vqa(self, images: np.ndarray, features: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """uint8 [B, 3, H, W], question features, mask -> answer logits [B, A]."""
        raise NotImplementedError

    def _caption_start(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def _caption_step(self, tokens: np.ndarray, past_k: np.ndarray, past_v: np.ndarray,
                      cross_k: np.ndarray, cross_v: np.ndarray) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def ping(self) -> None:
        raise NotImplementedError

    # prompts -------------------------------------------------------------------
    def tokenize(self, prompt: str | list[str] | Prompt) -> TokenizedPrompt:
        """A detection prompt ("red circle. star." or a list of phrases) or a built Prompt
        (a caption with phrase spans). PromptError (-> 422) for empty prompts, phrases
        without tokens, more than max_tokens tokens."""
        return tokenize(self.tokenizer, prompt if isinstance(prompt, Prompt) else build_prompt(prompt))

    def encode_question(self, question: str) -> np.ndarray:
        """Question -> token ids; PromptError (-> 422) when empty or over max_tokens."""
        if not self.answers:
            raise TaskUnavailable("this model has no VQA head (its checkpoint was trained without VQA)")
        return encode_question(self.tokenizer, question)

    def features(self, input_ids: np.ndarray) -> np.ndarray:
        """Token features [T, D] of one prompt or question, from the cache or the text encoder."""
        key = input_ids.astype(np.int64).tobytes()
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        ids = np.ascontiguousarray(input_ids[None], dtype=np.int64)
        feats = np.asarray(self._encode_text(ids, np.ones_like(ids))[0], dtype=np.float32)
        self.text_encoder_calls += 1
        self.cache.put(key, feats)
        return feats

    # batch ---------------------------------------------------------------------
    def _padded_features(self, sequences: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Features of each id sequence, padded to the bucket of the longest, and the mask."""
        feats = [self.features(ids) for ids in sequences]
        tp = bucket_length(max(f.shape[0] for f in feats), self.buckets)
        features = np.zeros((len(feats), tp, feats[0].shape[1]), dtype=np.float32)
        mask = np.zeros((len(feats), tp), dtype=np.int64)
        for i, f in enumerate(feats):
            features[i, : f.shape[0]] = f
            mask[i, : f.shape[0]] = 1
        return features, mask

    def run_batch(self, items: list[BatchItem]) -> list[Detections]:
        features, mask = self._padded_features([it.prompt.input_ids for it in items])
        images = np.ascontiguousarray(np.stack([it.pixels for it in items]))
        boxes, logits, ctr = self._detect(images, features, mask)
        self.detector_calls += 1
        # Each prompt's unpadded [P, T_i] map lines up with the padded logits (padding is
        # at the end), and each request keeps its own thresholds.
        return [
            postprocess(boxes[i], logits[i], ctr[i], it.prompt.positive_map, it.letterbox, it.postprocess)
            for i, it in enumerate(items)
        ]

    def run_vqa_batch(self, items: list[VqaItem]) -> list[Answer]:
        features, mask = self._padded_features([it.question_ids for it in items])
        logits = self._vqa(np.ascontiguousarray(np.stack([it.pixels for it in items])), features, mask)
        self.vqa_calls += 1
        return [rank_answers(logits[i:i + 1], self.answers, it.top_k)[0] for i, it in enumerate(items)]

    # the CaptionEngine protocol of glipv2.captioning
    def start(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        self.caption_steps += 1
        return self._caption_start(images)

    def step(self, tokens, past_k, past_v, cross_k, cross_v) -> tuple[np.ndarray, ...]:
        self.caption_steps += 1
        return self._caption_step(tokens, past_k, past_v, cross_k, cross_v)

    def run_caption_batch(self, items: list[CaptionItem]) -> list[Caption]:
        """One lockstep decode per beam size in the batch (usually one)."""
        if self.captioner is None:
            raise TaskUnavailable("this model has no caption decoder (its checkpoint was trained without captions)")
        groups: dict[int, list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            groups[it.beam_size].append(i)
        out: list[Caption | None] = [None] * len(items)
        for beam, idx in groups.items():
            pixels = np.ascontiguousarray(np.stack([items[i].pixels for i in idx]))
            for i, caption in zip(idx, self.captioner.caption_pixels(pixels, beam, [items[i].max_len for i in idx])):
                out[i] = caption
        return out

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

    def close(self) -> None:
        pass
