"""Run the exported graphs with ONNX Runtime (CPU, or CUDA when available)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.layout import CAPTION_START, CAPTION_STEP, DETECTOR, TEXT_ENCODER, VQA, model_file
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
        """onnx_dir: an export folder (<model>.onnx) or a Triton repository (<model>/1/model.onnx).
        The VQA and caption graphs are loaded when present (None otherwise)."""
        self.text = session(model_file(onnx_dir, TEXT_ENCODER, "onnx"), threads, spinning)
        self.detector = session(model_file(onnx_dir, DETECTOR, "onnx"), threads, spinning)

        def optional(name: str) -> ort.InferenceSession | None:
            path = model_file(onnx_dir, name, "onnx")
            return session(path, threads, spinning) if path.is_file() else None

        self.vqa_session = optional(VQA)
        start, step = optional(CAPTION_START), optional(CAPTION_STEP)
        self.captioner = OrtCaptionEngine(start, step) if start and step else None

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.text.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    def detect(self, images: np.ndarray, features: np.ndarray, attention_mask: np.ndarray):
        return tuple(self.detector.run(None, {"images": images, "token_features": features,
                                              "attention_mask": attention_mask}))

    def __call__(self, images: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray):
        return self.detect(images, self.encode_text(input_ids, attention_mask), attention_mask)

    def vqa(self, images: np.ndarray, features: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if self.vqa_session is None:
            raise RuntimeError("no vqa graph in this export (the model has no VQA head)")
        return self.vqa_session.run(None, {"images": images, "token_features": features,
                                           "attention_mask": attention_mask})[0]

    def answer(self, images: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """The VqaEngine of glipv2.understanding: question ids -> answer logits."""
        return self.vqa(images, self.encode_text(input_ids, attention_mask), attention_mask)


class OrtCaptionEngine:
    """caption_start.onnx / caption_step.onnx: the CaptionEngine of glipv2.captioning."""

    def __init__(self, start: ort.InferenceSession, step: ort.InferenceSession) -> None:
        self.start_session, self.step_session = start, step

    def start(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(self.start_session.run(None, {"images": images}))

    def step(self, tokens, past_k, past_v, cross_k, cross_v) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(self.step_session.run(None, {
            "tokens": np.asarray(tokens, dtype=np.int64).reshape(-1, 1), "past_k": past_k, "past_v": past_v,
            "cross_k": cross_k, "cross_v": cross_v}))


class OrtPredictor(DetectionPipeline):
    def __init__(self, onnx_dir: Path, image_hw: tuple[int, int], tokenizer: Tokenizer | None = None,
                 postprocess: PostprocessConfig = PostprocessConfig(), threads: int = 0) -> None:
        super().__init__(OrtEngine(onnx_dir, threads), image_hw, tokenizer, postprocess)
