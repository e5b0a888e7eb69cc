"""In-process PyTorch inference: the shared pipelines (glipv2.runtime) with the torch model
as the engine. Used by evaluation, training and the export parity checks."""

from __future__ import annotations

import numpy as np
import torch

from glipv2.modeling.glipv2 import GLIPv2
from glipv2.postprocess import PostprocessConfig
from glipv2.text import Tokenizer
from glipv2.runtime.pipeline import DetectionPipeline, VqaPipeline
from glipv2.understanding import CaptionPipeline


class TorchEngine:
    """The graphs' calls on the torch model (glipv2.runtime.batch.Engine): the same
    signatures as the exported graphs, so evaluation runs the gateway's batch assembly."""

    def __init__(self, model: GLIPv2, top_k: int = 1000) -> None:
        model.eval()
        self.model, self.top_k = model, top_k
        self.device = next(model.parameters()).device
        self.captioner = TorchCaptionEngine(model) if model.caption_decoder is not None else None

    def _t(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    @torch.no_grad()
    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.model.encode_text(self._t(input_ids), self._t(attention_mask)).float().cpu().numpy()

    @torch.no_grad()
    def detect(self, images: np.ndarray, features: np.ndarray, attention_mask: np.ndarray):
        mask = self._t(attention_mask)
        out = self.model.detect(self._t(images), self._t(features), mask)
        return tuple(t.float().cpu().numpy() for t in self.model.top_k(out, mask, self.top_k))

    @torch.no_grad()
    def vqa(self, images: np.ndarray, features: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        self.model.eval()
        return self.model.vqa(self._t(images), self._t(features), self._t(attention_mask)).float().cpu().numpy()


class TorchPredictor(DetectionPipeline):
    def __init__(self, model: GLIPv2, tokenizer: Tokenizer | None = None,
                 postprocess: PostprocessConfig | None = None, top_k: int = 1000) -> None:
        """postprocess: None = the settings the model was made for (PostprocessConfig.for_model)."""
        super().__init__(TorchEngine(model, top_k), model.cfg.image_hw, tokenizer,
                         postprocess if postprocess is not None else PostprocessConfig.for_model(model.cfg))
        self.model = model


class TorchCaptionEngine:
    """The caption decoder's start / step calls on the torch model (see glipv2.captioning)."""

    def __init__(self, model: GLIPv2) -> None:
        self.model = model
        self.device = next(model.parameters()).device

    def _np(self, *tensors: torch.Tensor) -> tuple[np.ndarray, ...]:
        return tuple(t.float().cpu().numpy() for t in tensors)

    @torch.no_grad()
    def start(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        self.model.eval()
        return self._np(*self.model.caption_start(torch.from_numpy(images).to(self.device)))

    @torch.no_grad()
    def step(self, tokens, past_k, past_v, cross_k, cross_v):
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        lp, k, v = self.model.caption_decoder.step(t(tokens), t(cross_k), t(cross_v), t(past_k), t(past_v))
        return self._np(lp, k, v)


class TorchUnderstanding:
    """VQA and captioning on the torch model through the shared numpy pipelines."""

    def __init__(self, model: GLIPv2, tokenizer: Tokenizer | None = None) -> None:
        tokenizer = tokenizer or Tokenizer(max_tokens=model.cfg.max_tokens)
        cfg = model.cfg
        self.vqa = VqaPipeline(TorchEngine(model), cfg.image_hw, cfg.vqa_answers, tokenizer) \
            if cfg.vqa_answers else None
        self.captioner = CaptionPipeline(TorchCaptionEngine(model), cfg.image_hw, cfg.caption_tokens,
                                         cfg.caption_max_len, cfg.caption_end_id, tokenizer,
                                         cfg.caption_words) if cfg.caption_tokens else None
