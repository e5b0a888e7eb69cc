"""The exported graphs: thin wrappers that fix input/output names and signatures.

One model definition (glipv2.modeling) is traced; nothing here re-implements the model.
`graph_specs` is the one table of graphs: ONNX export, config.pbtxt, the manifest and the
gateway all read names, dtypes and dims from it.

- text_encoder: input_ids, attention_mask -> token_features (cacheable per prompt).
- detector: images, token_features, attention_mask -> top-K boxes, logits, centerness.
- vqa: images, question token_features, attention_mask -> answer_logits.
- caption_start / caption_step: the caption decoder with a key/value cache. A step graph
  rather than the whole loop in one graph (ONNX Loop): beam search, per-request length
  limits and early exit of finished rows stay in numpy (glipv2.captioning), shared by every
  backend, and the graphs keep a fixed structure that TensorRT builds profiles for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from export.layout import CAPTION_START, CAPTION_STEP, DETECTOR, TEXT_ENCODER, VQA
from glipv2.captioning import MAX_BEAM
from glipv2.config import MAX_TOKENS, ModelConfig
from glipv2.modeling.caption import memory_length
from glipv2.modeling.glipv2 import GLIPv2

# name -> (dtype as in Triton, dims without the batch axis; -1 = the graph's dynamic axis)
Signature = dict[str, tuple[str, list[int]]]
TRT_OPT_TOKENS = 64  # the optimisation profile's "typical" prompt length (a token bucket)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: Signature
    outputs: Signature
    dynamic: str  # what the -1 dims count: "tokens" or "steps" ("" = none)
    dynamic_range: tuple[int, int, int]  # min, typical, max of that axis (TensorRT profiles)
    ragged: bool  # requests with different lengths may share a batch (zero padding is masked)
    batch_multiplier: int = 1  # batch limit = max_batch_size x this (caption steps carry every beam)


def graph_specs(cfg: ModelConfig, top_k: int) -> dict[str, GraphSpec]:
    """Every graph the model has (VQA and caption graphs only when it has those heads)."""
    h, w = cfg.image_hw
    tokens = ("tokens", (1, TRT_OPT_TOKENS, MAX_TOKENS))
    image = ("TYPE_UINT8", [3, h, w])
    features = ("TYPE_FP32", [-1, cfg.text_dim])
    mask = ("TYPE_INT64", [-1])
    specs = [
        GraphSpec(TEXT_ENCODER, {"input_ids": mask, "attention_mask": mask}, {"token_features": features},
                  *tokens, ragged=True),
        GraphSpec(DETECTOR, {"images": image, "token_features": features, "attention_mask": mask},
                  {"boxes": ("TYPE_FP32", [top_k, 4]), "logits": ("TYPE_FP32", [top_k, -1]),
                   "centerness": ("TYPE_FP32", [top_k])}, *tokens, ragged=True),
    ]
    if cfg.vqa_answers:
        specs.append(GraphSpec(VQA, {"images": image, "token_features": features, "attention_mask": mask},
                               {"answer_logits": ("TYPE_FP32", [len(cfg.vqa_answers)])}, *tokens, ragged=True))
    if cfg.caption_tokens:
        layers, heads = cfg.caption_layers, cfg.caption_heads
        d = cfg.caption_dim // heads
        logprobs = ("TYPE_FP32", [len(cfg.caption_tokens)])
        cross = ("TYPE_FP32", [layers, heads, memory_length(cfg), d])
        past = ("TYPE_FP32", [layers, heads, -1, d])
        specs.append(GraphSpec(CAPTION_START, {"images": image},
                               {"logprobs": logprobs, "present_k": ("TYPE_FP32", [layers, heads, 1, d]),
                                "present_v": ("TYPE_FP32", [layers, heads, 1, d]), "cross_k": cross, "cross_v": cross},
                               "", (1, 1, 1), ragged=False))
        # Not ragged: caches of different lengths must never be padded into one batch.
        specs.append(GraphSpec(CAPTION_STEP, {"tokens": ("TYPE_INT64", [1]), "past_k": past, "past_v": past,
                                              "cross_k": cross, "cross_v": cross},
                               {"logprobs": logprobs, "present_k": past, "present_v": past},
                               "steps", (1, 16, cfg.caption_max_len - 1), ragged=False, batch_multiplier=MAX_BEAM))
    return {s.name: s for s in specs}


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
        return GLIPv2.top_k(out, attention_mask, self.top_k)


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
