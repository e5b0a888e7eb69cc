"""The exported graphs' signatures and where their files live (torch-free).

`graph_specs` is the one table of graphs: ONNX export (export/graphs.py traces them under
these names), config.pbtxt and the manifest (export/repository.py), and the engines that
run them (glipv2.runtime.onnx, the gateway's Triton backend) all read names, dtypes and
dims from here.

- text_encoder: input_ids, attention_mask -> token_features (cacheable per prompt).
- detector: images, token_features, attention_mask -> top-K boxes, logits, centerness.
- vqa: images, question token_features, attention_mask -> answer_logits.
- caption_start / caption_step: the caption decoder with a key/value cache. A step graph
  rather than the whole loop in one graph (ONNX Loop): beam search, per-request length
  limits and early exit of finished rows stay in numpy (glipv2.captioning), shared by every
  backend, and the graphs keep a fixed structure that TensorRT builds profiles for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from glipv2.config import MAX_TOKENS, ModelConfig

TEXT_ENCODER = "text_encoder"
DETECTOR = "detector"
VQA = "vqa"
CAPTION_START = "caption_start"
CAPTION_STEP = "caption_step"
CAPTION = "caption"  # the decode loop inside Triton (not a graph: a python-backend model)

# Input and output names of every graph, in call order. Engines pass arrays positionally
# through these tuples, so a renamed tensor is renamed everywhere at once.
GRAPH_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    TEXT_ENCODER: (("input_ids", "attention_mask"), ("token_features",)),
    DETECTOR: (("images", "token_features", "attention_mask"), ("boxes", "logits", "centerness")),
    VQA: (("images", "token_features", "attention_mask"), ("answer_logits",)),
    CAPTION_START: (("images",), ("logprobs", "present_k", "present_v", "cross_k", "cross_v")),
    CAPTION_STEP: (("tokens", "past_k", "past_v", "cross_k", "cross_v"), ("logprobs", "present_k", "present_v")),
    # per image: beam size and token limit in, and (optional) which of the model's checked
    # phrases the detector found on it; the best hypothesis out (shortlist indices padded
    # with -1 to the longest of the request, its length, its summed log-probability)
    CAPTION: (("images", "beam_size", "max_len", "found"), ("tokens", "num_tokens", "logprob")),
}

# name -> (dtype as in Triton, dims without the batch axis; -1 = the graph's dynamic axis)
Signature = dict[str, tuple[str, list[int]]]
TRT_OPT_TOKENS = 64  # the optimisation profile's "typical" prompt length (a token bucket)


def inputs_of(graph: str) -> tuple[str, ...]:
    return GRAPH_IO[graph][0]


def outputs_of(graph: str) -> tuple[str, ...]:
    return GRAPH_IO[graph][1]


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: Signature
    outputs: Signature
    dynamic: str  # what the -1 dims count: "tokens" or "steps" ("" = none)
    dynamic_range: tuple[int, int, int]  # min, typical, max of that axis (TensorRT profiles)
    ragged: bool  # requests with different lengths may share a batch (zero padding is masked)
    batch_multiplier: int = 1  # batch limit = max_batch_size x this (caption steps carry every beam)
    optional: tuple[str, ...] = ()  # inputs a request may leave out (always the last ones)


def _spec(name: str, types: list[tuple[str, list[int]]], out_types: list[tuple[str, list[int]]], dynamic: str,
          dynamic_range: tuple[int, int, int], ragged: bool, batch_multiplier: int = 1,
          optional: tuple[str, ...] = ()) -> GraphSpec:
    ins, outs = GRAPH_IO[name]
    if tuple(ins[len(ins) - len(optional):]) != tuple(optional):
        raise ValueError(f"{name}: optional inputs must be the last ones")
    return GraphSpec(name, dict(zip(ins, types, strict=True)), dict(zip(outs, out_types, strict=True)), dynamic,
                     dynamic_range, ragged, batch_multiplier, optional)


def graph_specs(cfg: ModelConfig, top_k: int) -> dict[str, GraphSpec]:
    """Every graph the model has (VQA and caption graphs only when it has those heads)."""
    from glipv2.captioning import MAX_BEAM  # numpy: kept out of this module's import (export.tensorrt)

    h, w = cfg.image_hw
    tokens = ("tokens", (1, TRT_OPT_TOKENS, MAX_TOKENS))
    image = ("TYPE_UINT8", [3, h, w])
    features = ("TYPE_FP32", [-1, cfg.text_dim])
    mask = ("TYPE_INT64", [-1])
    specs = [
        _spec(TEXT_ENCODER, [mask, mask], [features], *tokens, ragged=True),
        _spec(DETECTOR, [image, features, mask],
              [("TYPE_FP32", [top_k, 4]), ("TYPE_FP32", [top_k, -1]), ("TYPE_FP32", [top_k])], *tokens, ragged=True),
    ]
    if cfg.vqa_answers:
        specs.append(_spec(VQA, [image, features, mask], [("TYPE_FP32", [len(cfg.vqa_answers)])], *tokens,
                           ragged=True))
    if cfg.caption_tokens:
        layers, heads = cfg.caption_layers, cfg.caption_heads
        d = cfg.caption_dim // heads
        logprobs = ("TYPE_FP32", [len(cfg.caption_tokens)])
        cross = ("TYPE_FP32", [layers, heads, cfg.caption_memory_length, d])
        past = ("TYPE_FP32", [layers, heads, -1, d])
        first = ("TYPE_FP32", [layers, heads, 1, d])
        specs.append(_spec(CAPTION_START, [image], [logprobs, first, first, cross, cross], "", (1, 1, 1),
                           ragged=False))
        # Not ragged: caches of different lengths must never be padded into one batch.
        specs.append(_spec(CAPTION_STEP, [("TYPE_INT64", [1]), past, past, cross, cross], [logprobs, past, past],
                           "steps", (1, 16, cfg.caption_max_len - 1), ragged=False, batch_multiplier=MAX_BEAM))
    return {s.name: s for s in specs}


def caption_loop_spec(cfg: ModelConfig) -> GraphSpec | None:
    """The `caption` loop model's signature (None for a model without a caption decoder).
    Its batch is images (max_batch_size, like caption_start); tokens is ragged per request.
    found (uint8 0/1, one per checked phrase of the model: uint8 crosses the python
    backend's boundary as the images do) is optional: a request without it decodes
    unchecked."""
    if not cfg.caption_tokens:
        return None
    h, w = cfg.image_hw
    found = ("TYPE_UINT8", [max(1, len(cfg.caption_checked_phrases))])  # Triton dims are positive
    return _spec(CAPTION, [("TYPE_UINT8", [3, h, w]), ("TYPE_INT32", [1]), ("TYPE_INT32", [1]), found],
                 [("TYPE_INT64", [-1]), ("TYPE_INT32", [1]), ("TYPE_FP64", [1])], "steps",
                 (1, 16, cfg.caption_max_len - 1), ragged=False, optional=("found",))


def opt_batch(max_batch_size: int) -> int:
    """The batch size TensorRT optimises for (a profile's opt shape): half the maximum.
    One rule for the gpu flavour's plans and the gpu-onnx flavour's engines."""
    return max(1, int(max_batch_size) // 2)


def model_file(root: str | os.PathLike, model: str, ext: str) -> Path:
    """`<root>/<model>/1/model.<ext>` (Triton layout), else `<root>/<model>.<ext>` (an
    export folder) if that exists."""
    root = Path(root)
    triton = root / model / "1" / f"model.{ext}"
    flat = root / f"{model}.{ext}"
    return flat if not triton.exists() and flat.exists() else triton
