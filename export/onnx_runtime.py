"""Run the exported graphs with ONNX Runtime (CPU, or CUDA when available)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.layout import DETECTOR, TEXT_ENCODER, model_file
from glipv2.pipeline import DetectionPipeline
from glipv2.postprocess import PostprocessConfig
from glipv2.text import Tokenizer


def session(path: Path, threads: int = 0, spinning: bool = True) -> ort.InferenceSession:
    """spinning=False stops ORT's worker threads from spin-waiting after each run (its
    default): with two sessions on few cores, one session's spinning threads steal the
    other's cores (measured on 2 cores by the gateway: an uncached request 19.4 ms with
    spinning, 10.7 ms without)."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


class OrtEngine:
    """text_encoder.onnx then detector.onnx: the Engine of glipv2.pipeline."""

    def __init__(self, onnx_dir: Path, threads: int = 0, spinning: bool = True) -> None:
        """onnx_dir: an export folder (<model>.onnx) or a Triton repository (<model>/1/model.onnx)."""
        self.text = session(model_file(onnx_dir, TEXT_ENCODER, "onnx"), threads, spinning)
        self.detector = session(model_file(onnx_dir, DETECTOR, "onnx"), threads, spinning)

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.text.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    def detect(self, images: np.ndarray, features: np.ndarray, attention_mask: np.ndarray):
        return tuple(self.detector.run(None, {"images": images, "token_features": features,
                                              "attention_mask": attention_mask}))

    def __call__(self, images: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray):
        return self.detect(images, self.encode_text(input_ids, attention_mask), attention_mask)


class OrtPredictor(DetectionPipeline):
    def __init__(self, onnx_dir: Path, image_hw: tuple[int, int], tokenizer: Tokenizer | None = None,
                 postprocess: PostprocessConfig = PostprocessConfig(), threads: int = 0) -> None:
        super().__init__(OrtEngine(onnx_dir, threads), image_hw, tokenizer, postprocess)
