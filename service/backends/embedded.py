"""Embedded backend: the repository's ONNX files run by ONNX Runtime in this process."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import logging

import onnxruntime as ort

from export.onnx_runtime import OrtEngine, installed_ort_distributions
from service.backends.base import EngineBackend

log = logging.getLogger("service")


class EmbeddedBackend(EngineBackend):
    """ONNX Runtime in this process (CUDA provider when present, else CPU)."""

    name = "embedded"

    def __init__(self, repository: Path, cache_size: int = 1024, threads: int = 0, spinning: bool = False,
                 cache_bytes: int = 64 * 1024 * 1024, device: str = "auto") -> None:
        """device: "auto", "cpu" or "cuda"; with "cuda" the backend refuses to start
        (export.onnx_runtime.DeviceError) unless ONNX Runtime really runs the models on CUDA."""
        super().__init__(repository, cache_size, cache_bytes)
        for model in self.models():
            path = self.repository / model / "1" / "model.onnx"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing; run `make export` to write the ONNX files")
        self.engine = OrtEngine(self.repository, threads, spinning, device)
        self.device = self.engine.device
        self.providers = self.engine.providers
        dists = installed_ort_distributions()
        log.info("embedded backend: ONNX Runtime %s runs the models on %s (providers: %s)", ort.__version__,
                 self.device, ", ".join(self.providers))
        if len(dists) > 1:
            log.warning("both %s are installed: they overwrite the same onnxruntime module; keep one "
                        "(the `cpu` or the `gpu` extra)", " and ".join(dists))

    def _encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.engine.encode_text(input_ids, attention_mask)

    def _detect(self, images: np.ndarray, features: np.ndarray, attention_mask: np.ndarray):
        return self.engine.detect(images, features, attention_mask)

    def _vqa(self, images: np.ndarray, features: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.engine.vqa(images, features, attention_mask)

    def _caption_start(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        return self.engine.captioner.start(images)

    def _caption_step(self, tokens, past_k, past_v, cross_k, cross_v) -> tuple[np.ndarray, ...]:
        return self.engine.captioner.step(tokens, past_k, past_v, cross_k, cross_v)

    def ping(self) -> None:
        ids = np.array([[self.tokenizer.cls_id, self.tokenizer.sep_id]], dtype=np.int64)
        self.engine.encode_text(ids, np.ones_like(ids))
