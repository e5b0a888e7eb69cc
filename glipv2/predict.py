"""In-process PyTorch inference: the shared pipeline with the torch model as the engine.
Used by evaluation, the export parity checks and the CLI."""

from __future__ import annotations

import numpy as np
import torch

from glipv2.modeling.glipv2 import GLIPv2
from glipv2.pipeline import DetectionPipeline
from glipv2.postprocess import PostprocessConfig
from glipv2.text import Tokenizer
from glipv2.understanding import CaptionPipeline, VqaPipeline


def torch_engine(model: GLIPv2, top_k: int):
    model.eval()
    device = next(model.parameters()).device

    @torch.no_grad()
    def run(images: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray):
        mask = torch.from_numpy(attention_mask).to(device)
        out = model(torch.from_numpy(images).to(device), torch.from_numpy(input_ids).to(device), mask)
        return tuple(t.float().cpu().numpy() for t in GLIPv2.top_k(out, mask, top_k))

    return run


class TorchPredictor(DetectionPipeline):
    def __init__(self, model: GLIPv2, tokenizer: Tokenizer | None = None,
                 postprocess: PostprocessConfig = PostprocessConfig(), top_k: int = 1000) -> None:
        super().__init__(torch_engine(model, top_k), model.cfg.image_hw, tokenizer, postprocess)
        self.model = model


def torch_vqa_engine(model: GLIPv2):
    device = next(model.parameters()).device

    @torch.no_grad()
    def run(images: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        model.eval()
        mask = torch.from_numpy(attention_mask).to(device)
        text = model.encode_text(torch.from_numpy(input_ids).to(device), mask)
        return model.vqa(torch.from_numpy(images).to(device), text, mask).float().cpu().numpy()

    return run


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
        self.vqa = VqaPipeline(torch_vqa_engine(model), cfg.image_hw, cfg.vqa_answers, tokenizer) \
            if cfg.vqa_answers else None
        self.captioner = CaptionPipeline(TorchCaptionEngine(model), cfg.image_hw, cfg.caption_tokens,
                                         cfg.caption_max_len, cfg.caption_end_id, tokenizer) if cfg.caption_tokens else None
