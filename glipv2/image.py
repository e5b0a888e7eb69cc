"""Image preprocessing with PIL + numpy (no torch): letterbox into a fixed model input.

The output stays uint8 RGB CHW: it is 4x smaller than float32 to ship to Triton, and
the model graph does the mean/std normalisation (and RGB->BGR for official GLIP
weights) itself, so every backend sees identical input.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from glipv2.boxes import HW, Letterbox

__all__ = ["PAD_VALUE", "pad_value_for", "to_pil_rgb", "letterbox", "letterbox_batch"]

# YOLO-style grey: padding near the data mean disturbs normalisation statistics least.
PAD_VALUE = 114


def pad_value_for(pixel_mean: Sequence[float], bgr: bool, pad_with_mean: bool) -> int | tuple[int, int, int]:
    """The letterbox padding a model expects: PAD_VALUE, or (official GLIP, which pads the
    normalised tensor with zeros) its RGB pixel mean, so the padding normalises to ~0."""
    if not pad_with_mean:
        return PAD_VALUE
    rgb = list(pixel_mean)[::-1] if bgr else list(pixel_mean)
    r, g, b = (int(round(v)) for v in rgb)
    return r, g, b


def to_pil_rgb(image: np.ndarray | Image.Image) -> Image.Image:
    """PIL image of any mode, or a uint8 HxWx3 (RGB) / HxW (grey) array -> RGB PIL."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image array must be HxWx3 RGB, got shape {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr))  # uint8 HxWx3 -> RGB


def letterbox(
    image: np.ndarray | Image.Image, target_hw: HW, pad_value: int | Sequence[int] = PAD_VALUE, *,
    orig_hw: HW | None = None, max_side: int = 0,
) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping aspect ratio to fit target_hw (PIL bilinear; max_side > 0 also caps
    the long side), paste top-left and pad the bottom/right with pad_value (one value or
    one per RGB channel). Returns (uint8 [3, th, tw] RGB, Letterbox).

    orig_hw: the size of the image `image` was decoded from at reduced scale (a JPEG in
    draft mode); the Letterbox then maps model-input boxes to those original pixels."""
    pil = to_pil_rgb(image)
    w, h = pil.size
    lb = Letterbox.fit(orig_hw or (h, w), target_hw, max_side)
    rh, rw = lb.resized_hw
    if (rh, rw) != (h, w):
        pil = pil.resize((rw, rh), Image.BILINEAR)
    th, tw = lb.target_hw
    out = np.empty((3, th, tw), dtype=np.uint8)
    out[:] = np.asarray(pad_value, dtype=np.uint8).reshape(-1, 1, 1)
    out[:, :rh, :rw] = np.asarray(pil, dtype=np.uint8).transpose(2, 0, 1)
    return out, lb


def letterbox_batch(
    images: Sequence[np.ndarray | Image.Image], target_hw: HW, pad_value: int | Sequence[int] = PAD_VALUE, *,
    max_side: int = 0,
) -> tuple[np.ndarray, list[Letterbox]]:
    """Letterbox every image into the same target size: (uint8 [B, 3, th, tw], boxes)."""
    if len(images) == 0:
        th, tw = target_hw
        return np.zeros((0, 3, th, tw), dtype=np.uint8), []
    arrays, boxes = zip(*(letterbox(im, target_hw, pad_value, max_side=max_side) for im in images))
    return np.stack(arrays), list(boxes)
