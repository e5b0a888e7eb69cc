"""The exported graphs: thin wrappers that fix input/output names and signatures.

One model definition (glipv2.modeling) is traced; nothing here re-implements the model.
Names are the contract with config.pbtxt, the manifest and the gateway.
"""

from __future__ import annotations

import torch
from torch import nn

from export.layout import DETECTOR, TEXT_ENCODER  # noqa: F401  (re-exported)
from glipv2.modeling.glipv2 import GLIPv2

# name -> (dtype as in Triton, shape without batch; -1 = dynamic)
TEXT_INPUTS = {"input_ids": ("TYPE_INT64", [-1]), "attention_mask": ("TYPE_INT64", [-1])}
DETECTOR_OUTPUT_NAMES = ("boxes", "logits", "centerness")


def text_outputs(text_dim: int) -> dict[str, tuple[str, list[int]]]:
    return {"token_features": ("TYPE_FP32", [-1, text_dim])}


def detector_inputs(image_hw: tuple[int, int], text_dim: int) -> dict[str, tuple[str, list[int]]]:
    return {
        "images": ("TYPE_UINT8", [3, image_hw[0], image_hw[1]]),
        "token_features": ("TYPE_FP32", [-1, text_dim]),
        "attention_mask": ("TYPE_INT64", [-1]),
    }


def detector_outputs(top_k: int) -> dict[str, tuple[str, list[int]]]:
    return {
        "boxes": ("TYPE_FP32", [top_k, 4]),
        "logits": ("TYPE_FP32", [top_k, -1]),
        "centerness": ("TYPE_FP32", [top_k]),
    }


class TextEncoderGraph(nn.Module):
    """input_ids [B, T] int64, attention_mask [B, T] int64 -> token_features [B, T, D] fp32."""

    def __init__(self, model: GLIPv2) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)


class DetectorGraph(nn.Module):
    """images [B, 3, H, W] uint8 RGB (letterboxed), token_features [B, T, D], attention_mask
    [B, T] -> boxes [B, K, 4] (model-input pixels), logits [B, K, T], centerness [B, K] for
    the K best anchors. No NMS: that stays in numpy postprocessing, outside the engines."""

    def __init__(self, model: GLIPv2, top_k: int) -> None:
        super().__init__()
        self.model = model
        self.top_k = top_k

    def forward(
        self, images: torch.Tensor, token_features: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model.detect(images, token_features, attention_mask)
        return GLIPv2.top_k(out, attention_mask, self.top_k)
