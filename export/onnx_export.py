"""Export every graph of a checkpoint to ONNX (see export/graphs.py for the list).

All graphs have a dynamic batch axis; token inputs have a dynamic token axis (1..256) and
the caption step graph a dynamic cache length. The image size is fixed by the preset
(letterboxing happens before the graph); the detector's top-K anchor selection runs
inside the graph so only K x T logits leave it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from export.graphs import example_inputs, graph_module, graph_specs
from glipv2.modeling.glipv2 import GLIPv2

OPSET = 17


def export_onnx(model: GLIPv2, out_dir: Path, top_k: int = 100) -> dict[str, Path]:
    """Write out_dir/<graph>.onnx for every graph of the model; returns {graph: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    examples = example_inputs(model)
    files = {}
    for name, spec in graph_specs(model.cfg, top_k).items():
        axes = {}
        for tensor, (_, dims) in {**spec.inputs, **spec.outputs}.items():
            axes[tensor] = {0: "batch", **{i + 1: spec.dynamic for i, d in enumerate(dims) if d == -1}}
        files[name] = out_dir / f"{name}.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks
            torch.onnx.export(graph_module(name, model, top_k), examples[name], str(files[name]),
                              opset_version=OPSET, dynamo=False, input_names=list(spec.inputs),
                              output_names=list(spec.outputs), dynamic_axes=axes)
    model.train(False)
    return files
