"""In-process PyTorch inference: images + prompts -> detections.

The same steps the gateway runs with ONNX Runtime or Triton (letterbox, tokenize, pad,
top-K in the graph, numpy postprocess), with the torch model as the engine. Used by
evaluation, the export parity checks and the CLI.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from glipv2.image import letterbox_batch
from glipv2.modeling.glipv2 import GLIPv2
from glipv2.postprocess import Detections, PostprocessConfig, postprocess_batch
from glipv2.text import Prompt, Tokenizer, pad_batch, tokenize


class TorchPredictor:
    def __init__(self, model: GLIPv2, tokenizer: Tokenizer | None = None,
                 postprocess: PostprocessConfig = PostprocessConfig(), top_k: int = 1000) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer or Tokenizer()
        self.postprocess = postprocess
        self.top_k = top_k
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def predict(self, images: Sequence[np.ndarray], prompts: Sequence[Prompt]) -> list[Detections]:
        """One prompt per image (prompts may differ in length and phrase count)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        pixels, boxes_map = letterbox_batch(images, self.model.cfg.image_hw)
        tb = pad_batch([tokenize(self.tokenizer, p) for p in prompts], pad_id=self.tokenizer.pad_id)
        ids = torch.from_numpy(tb.input_ids).to(self.device)
        mask = torch.from_numpy(tb.attention_mask).to(self.device)
        out = self.model(torch.from_numpy(pixels).to(self.device), ids, mask)
        boxes, logits, ctr = GLIPv2.top_k(out, mask, self.top_k)
        return postprocess_batch(
            boxes.float().cpu().numpy(), logits.float().cpu().numpy(), ctr.float().cpu().numpy(),
            tb.positive_map, boxes_map, self.postprocess,
        )
