"""Where a model's files live: a Triton repository or a flat export folder (no heavy imports)."""

from __future__ import annotations

import os
from pathlib import Path

TEXT_ENCODER = "text_encoder"
DETECTOR = "detector"
VQA = "vqa"
CAPTION_START = "caption_start"
CAPTION_STEP = "caption_step"


def model_file(root: str | os.PathLike, model: str, ext: str) -> Path:
    """`<root>/<model>/1/model.<ext>` (Triton layout), else `<root>/<model>.<ext>` (an
    export folder) if that exists."""
    root = Path(root)
    triton = root / model / "1" / f"model.{ext}"
    flat = root / f"{model}.{ext}"
    return flat if not triton.exists() and flat.exists() else triton


def opt_batch(max_batch_size: int) -> int:
    """The batch size TensorRT optimises for (a profile's opt shape): half the maximum.
    One rule for the gpu flavour's plans and the gpu-onnx flavour's engines."""
    return max(1, int(max_batch_size) // 2)
