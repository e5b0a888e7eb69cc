"""Embedded backend: the repository's ONNX files run by ONNX Runtime in this process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.onnx_runtime import OrtEngine
from service.backends.base import EngineBackend


def _session(path: Path, threads: int, spinning: bool) -> ort.InferenceSession:
    """export.onnx_runtime.session plus control over intra-op spinning. ORT's worker
    threads spin-wait after each run by default; with two sessions on few cores the text
    encoder's spinning threads steal the detector's cores (measured on 2 cores: an
    uncached request 19.4 ms with spinning, 10.7 ms without; cached 7.5 vs 6.9 ms)."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


class _RepositoryEngine(OrtEngine):
    """OrtEngine (encode_text, detect) over a model repository's layout (<model>/1/model.onnx)."""

    def __init__(self, repository: Path, threads: int = 0, spinning: bool = False) -> None:
        self.text = _session(repository / "text_encoder" / "1" / "model.onnx", threads, spinning=False)
        self.detector = _session(repository / "detector" / "1" / "model.onnx", threads, spinning)


class EmbeddedBackend(EngineBackend):
    """ONNX Runtime in this process (CUDA provider when present, else CPU)."""

    name = "embedded"

    def __init__(self, repository: Path, cache_size: int = 1024, threads: int = 0, spinning: bool = False) -> None:
        super().__init__(repository, cache_size)
        for model in ("text_encoder", "detector"):
            path = self.repository / model / "1" / "model.onnx"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing; run `make export` to write the ONNX files")
        self.engine = _RepositoryEngine(self.repository, threads, spinning)

    def _encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.engine.encode_text(input_ids, attention_mask)

    def _detect(self, images: np.ndarray, features: np.ndarray, attention_mask: np.ndarray):
        return self.engine.detect(images, features, attention_mask)

    def ping(self) -> None:
        ids = np.array([[self.tokenizer.cls_id, self.tokenizer.sep_id]], dtype=np.int64)
        self.engine.encode_text(ids, np.ones_like(ids))
