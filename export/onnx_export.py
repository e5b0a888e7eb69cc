"""Export the text encoder and the detector of a checkpoint to ONNX.

Both graphs have a dynamic batch axis and a dynamic token axis (1..256); the detector's
image size is fixed by the preset (letterboxing happens before the graph), and its top-K
anchor selection runs inside the graph so only K x T logits leave it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from export.graphs import DETECTOR, DETECTOR_OUTPUT_NAMES, TEXT_ENCODER, DetectorGraph, TextEncoderGraph
from glipv2.modeling.glipv2 import GLIPv2

OPSET = 17


@dataclass(frozen=True)
class OnnxFiles:
    text_encoder: Path
    detector: Path


def _example_inputs(model: GLIPv2, batch: int = 2, tokens: int = 7) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    h, w = model.cfg.image_hw
    images = torch.randint(0, 256, (batch, 3, h, w), generator=g, dtype=torch.uint8)
    ids = torch.randint(1000, 5000, (batch, tokens), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids)
    return images, ids, mask


def export_onnx(model: GLIPv2, out_dir: Path, top_k: int = 100) -> OnnxFiles:
    """Write out_dir/text_encoder.onnx and out_dir/detector.onnx; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    images, ids, mask = _example_inputs(model)
    text_graph = TextEncoderGraph(model).eval()  # eval(): export restores a wrapper's own mode afterwards
    detector_graph = DetectorGraph(model, top_k).eval()
    tokens = {0: "batch", 1: "tokens"}
    files = OnnxFiles(out_dir / f"{TEXT_ENCODER}.onnx", out_dir / f"{DETECTOR}.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks
        torch.onnx.export(
            text_graph, (ids, mask), str(files.text_encoder), opset_version=OPSET, dynamo=False,
            input_names=["input_ids", "attention_mask"], output_names=["token_features"],
            dynamic_axes={"input_ids": tokens, "attention_mask": tokens, "token_features": tokens},
        )
        features = text_graph(ids, mask)
        torch.onnx.export(
            detector_graph, (images, features, mask), str(files.detector), opset_version=OPSET, dynamo=False,
            input_names=["images", "token_features", "attention_mask"], output_names=list(DETECTOR_OUTPUT_NAMES),
            dynamic_axes={
                "images": {0: "batch"}, "token_features": tokens, "attention_mask": tokens,
                "boxes": {0: "batch"}, "logits": {0: "batch", 2: "tokens"}, "centerness": {0: "batch"},
            },
        )
    model.train(False)
    return files
