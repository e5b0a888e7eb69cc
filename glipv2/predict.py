"""In-process PyTorch inference: the shared pipeline with the torch model as the engine.
Used by evaluation, the export parity checks and the CLI."""

from __future__ import annotations

import numpy as np
import torch

from glipv2.modeling.glipv2 import GLIPv2
from glipv2.pipeline import DetectionPipeline
from glipv2.postprocess import PostprocessConfig
from glipv2.text import Tokenizer


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
