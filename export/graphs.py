"""The exported graphs: thin torch wrappers that fix input/output names and signatures.

One model definition (glipv2.modeling) is traced; nothing here re-implements the model.
The names, dtypes and dims are glipv2.runtime.graphs' table (`graph_specs`, re-exported
here), which the torch-free gateway reads too.
"""

from __future__ import annotations

import torch
from torch import nn

from glipv2.modeling.glipv2 import GLIPv2
from glipv2.runtime.graphs import (CAPTION_START, CAPTION_STEP, DETECTOR, TEXT_ENCODER, TRT_OPT_TOKENS, VQA,
                                   GraphSpec, Signature, graph_specs)

__all__ = ["GraphSpec", "Signature", "TRT_OPT_TOKENS", "graph_specs", "graph_module", "example_inputs"]


class TextEncoderGraph(nn.Module):
    def __init__(self, model: GLIPv2) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)


class DetectorGraph(nn.Module):
    """Boxes in model-input pixels for the K best anchors. No NMS: that stays in numpy
    postprocessing, outside the engines."""

    def __init__(self, model: GLIPv2, top_k: int) -> None:
        super().__init__()
        self.model = model
        self.top_k = top_k

    def forward(self, images: torch.Tensor, token_features: torch.Tensor, attention_mask: torch.Tensor):
        out = self.model.detect(images, token_features, attention_mask)
        return self.model.top_k(out, attention_mask, self.top_k)


class VqaGraph(nn.Module):
    def __init__(self, model: GLIPv2) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, token_features: torch.Tensor, attention_mask: torch.Tensor):
        return self.model.vqa(images, token_features, attention_mask)


class CaptionStartGraph(nn.Module):
    def __init__(self, model: GLIPv2) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        return self.model.caption_start(images)


class CaptionStepGraph(nn.Module):
    def __init__(self, model: GLIPv2) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                cross_k: torch.Tensor, cross_v: torch.Tensor):
        return self.model.caption_decoder.step(tokens[:, 0], cross_k, cross_v, past_k, past_v)


def graph_module(name: str, model: GLIPv2, top_k: int) -> nn.Module:
    modules = {TEXT_ENCODER: lambda: TextEncoderGraph(model), DETECTOR: lambda: DetectorGraph(model, top_k),
               VQA: lambda: VqaGraph(model), CAPTION_START: lambda: CaptionStartGraph(model),
               CAPTION_STEP: lambda: CaptionStepGraph(model)}
    return modules[name]().eval()  # eval(): export restores a wrapper's own mode afterwards


@torch.no_grad()
def example_inputs(model: GLIPv2, batch: int = 2, tokens: int = 7, steps: int = 3) -> dict[str, tuple[torch.Tensor, ...]]:
    """Inputs to trace every graph with: batch 2, 7 tokens, a 3-step caption cache."""
    g = torch.Generator().manual_seed(0)
    h, w = model.cfg.image_hw
    images = torch.randint(0, 256, (batch, 3, h, w), generator=g, dtype=torch.uint8)
    ids = torch.randint(1000, 5000, (batch, tokens), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids)
    features = model.encode_text(ids, mask)
    out = {TEXT_ENCODER: (ids, mask), DETECTOR: (images, features, mask), VQA: (images, features, mask),
           CAPTION_START: (images,)}
    if model.caption_decoder is not None:
        _, past_k, past_v, cross_k, cross_v = model.caption_start(images)
        tok = torch.zeros(batch, dtype=torch.int64)
        for _ in range(steps - 1):
            _, past_k, past_v = model.caption_decoder.step(tok, cross_k, cross_v, past_k, past_v)
        out[CAPTION_STEP] = (tok[:, None], past_k, past_v, cross_k, cross_v)
    return out
