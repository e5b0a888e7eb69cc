"""Embedded backend: the repository's ONNX files run by ONNX Runtime in this process."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.onnx_runtime import OrtEngine
from service.backends.base import EngineBackend


class EmbeddedBackend(EngineBackend):
    """ONNX Runtime in this process (CUDA provider when present, else CPU)."""

    name = "embedded"

    def __init__(self, repository: Path, cache_size: int = 1024, threads: int = 0, spinning: bool = False) -> None:
        super().__init__(repository, cache_size)
        for model in ("text_encoder", "detector"):
            path = self.repository / model / "1" / "model.onnx"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing; run `make export` to write the ONNX files")
        self.engine = OrtEngine(self.repository, threads, spinning)

    def _encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.engine.encode_text(input_ids, attention_mask)

    def _detect(self, images: np.ndarray, features: np.ndarray, attention_mask: np.ndarray):
        return self.engine.detect(images, features, attention_mask)

    def ping(self) -> None:
        ids = np.array([[self.tokenizer.cls_id, self.tokenizer.sep_id]], dtype=np.int64)
        self.engine.encode_text(ids, np.ones_like(ids))
