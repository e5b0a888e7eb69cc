"""What every backend does: tokenized prompts + letterboxed images -> detections.

EngineBackend holds what the embedded and Triton backends share. Text features are
cached per prompt (LRU keyed by token ids): every prompt is encoded alone and unpadded,
so a cached prompt skips the text encoder and a hit gives the same bits as a miss (the
features never depend on the batch). A batch pads the features of prompts of different
lengths to the smallest token bucket that fits the longest, with the attention mask zero
on padding, and runs the detector once.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from glipv2.boxes import Letterbox
from glipv2.postprocess import Detections, PostprocessConfig, postprocess
from glipv2.text import Prompt, TokenizedPrompt, Tokenizer, bucket_length, build_prompt, tokenize

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


class Backend(Protocol):
    name: str
    manifest: dict
    image_hw: tuple[int, int]

    def tokenize(self, prompt: str | list[str] | Prompt) -> TokenizedPrompt: ...

    def run_batch(self, items: list[BatchItem]) -> list[Detections]:
        """Blocking: one engine call for the whole batch (called in a worker thread)."""
        ...

    def ping(self) -> None:
        """Blocking: raise if the backend cannot answer."""
        ...

    def stats(self) -> dict: ...

    def close(self) -> None: ...


class FeatureCache:
    """Thread-safe LRU: token ids (bytes) -> token features [T, D]."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self._data: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
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
        if self.capacity <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class EngineBackend:
    """Tokenizer, prompt-feature cache, bucket padding and postprocessing around two
    engine calls that subclasses provide: _encode_text and _detect."""

    name = "engine"

    def __init__(self, repository: Path, cache_size: int = 1024) -> None:
        self.repository = Path(repository)
        self.manifest = load_manifest(self.repository)
        self.image_hw = tuple(self.manifest["image"]["hw"])
        self.max_tokens = int(self.manifest["max_tokens"])
        self.buckets = tuple(sorted(self.manifest["token_buckets"]))
        self.tokenizer = Tokenizer(self.repository / self.manifest["tokenizer"], max_tokens=self.max_tokens)
        self.cache = FeatureCache(cache_size)
        self.text_encoder_calls = 0
        self.detector_calls = 0

    # engine calls ------------------------------------------------------------
    def _encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """int64 [B, T] x2 -> float32 token features [B, T, D]."""
        raise NotImplementedError

    def _detect(self, images: np.ndarray, features: np.ndarray, attention_mask: np.ndarray):
        """uint8 [B, 3, H, W], float32 [B, T, D], int64 [B, T] -> boxes [B, K, 4], logits [B, K, T], centerness [B, K]."""
        raise NotImplementedError

    def ping(self) -> None:
        raise NotImplementedError

    # prompts -------------------------------------------------------------------
    def tokenize(self, prompt: str | list[str] | Prompt) -> TokenizedPrompt:
        """A detection prompt ("red circle. star." or a list of phrases) or a built Prompt
        (a caption with phrase spans). PromptError (-> 422) for empty prompts, phrases
        without tokens, more than max_tokens tokens."""
        return tokenize(self.tokenizer, prompt if isinstance(prompt, Prompt) else build_prompt(prompt))

    def features(self, prompt: TokenizedPrompt) -> np.ndarray:
        """Token features [T, D] of one prompt, from the cache or the text encoder."""
        key = prompt.input_ids.astype(np.int64).tobytes()
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        ids = np.ascontiguousarray(prompt.input_ids[None], dtype=np.int64)
        feats = np.asarray(self._encode_text(ids, np.ones_like(ids))[0], dtype=np.float32)
        self.text_encoder_calls += 1
        self.cache.put(key, feats)
        return feats

    # batch ---------------------------------------------------------------------
    def run_batch(self, items: list[BatchItem]) -> list[Detections]:
        feats = [self.features(it.prompt) for it in items]
        tp = bucket_length(max(f.shape[0] for f in feats), self.buckets)
        b, d = len(items), feats[0].shape[1]
        features = np.zeros((b, tp, d), dtype=np.float32)
        mask = np.zeros((b, tp), dtype=np.int64)
        for i, f in enumerate(feats):
            features[i, : f.shape[0]] = f
            mask[i, : f.shape[0]] = 1
        images = np.ascontiguousarray(np.stack([it.pixels for it in items]))
        boxes, logits, ctr = self._detect(images, features, mask)
        self.detector_calls += 1
        # Each prompt's unpadded [P, T_i] map lines up with the padded logits (padding is
        # at the end), and each request keeps its own thresholds.
        return [
            postprocess(boxes[i], logits[i], ctr[i], it.prompt.positive_map, it.letterbox, it.postprocess)
            for i, it in enumerate(items)
        ]

    def stats(self) -> dict:
        return {
            "cache_hits": self.cache.hits,
            "cache_misses": self.cache.misses,
            "cache_size": len(self.cache),
            "text_encoder_calls": self.text_encoder_calls,
            "detector_calls": self.detector_calls,
        }

    def close(self) -> None:
        pass
