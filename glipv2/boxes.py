"""Box geometry in numpy: conversions, IoU, anchors, NMS, letterbox mapping.

Conventions used everywhere in the project:
- sizes are (h, w);
- boxes are xyxy float32 pixels in continuous coordinates (width = x2 - x1, no "+1"
  as in the old maskrcnn-benchmark code), xywh means COCO's (x, y, w, h) top-left form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = [
    "xyxy_to_xywh",
    "xywh_to_xyxy",
    "box_area",
    "box_iou",
    "clip_boxes",
    "anchor_grid",
    "nms",
    "batched_nms",
    "letterbox_scale",
    "Letterbox",
]

HW = tuple[int, int]


def _as_boxes(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float32)
    if b.ndim == 1 and b.size == 0:
        b = b.reshape(0, 4)
    if b.shape[-1] != 4:
        raise ValueError(f"boxes must have 4 coordinates in the last axis, got shape {b.shape}")
    return b


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    b = _as_boxes(boxes)
    return np.concatenate([b[..., :2], b[..., 2:] - b[..., :2]], axis=-1)


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    b = _as_boxes(boxes)
    return np.concatenate([b[..., :2], b[..., :2] + b[..., 2:]], axis=-1)


def box_area(boxes: np.ndarray) -> np.ndarray:
    b = _as_boxes(boxes)
    # Inverted boxes count as empty rather than negative area.
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU [N, M]. Pairs whose union is empty get IoU 0."""
    a, b = _as_boxes(a), _as_boxes(b)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def clip_boxes(boxes: np.ndarray, hw: HW) -> np.ndarray:
    b = _as_boxes(boxes).copy()
    h, w = hw
    b[..., 0::2] = np.clip(b[..., 0::2], 0, w)
    b[..., 1::2] = np.clip(b[..., 1::2], 0, h)
    return b


# ----------------------------------------------------------------------------- anchors


def anchor_grid(
    image_hw: HW, strides: Sequence[int], anchor_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """One square anchor per feature-map location per FPN level (GLIP/ATSS uses one).

    Level l has a ceil(h/s) x ceil(w/s) grid: a stride-2 conv (kernel 3, pad 1) maps n
    to ceil(n/2), so this is the size the backbone actually produces. Anchors are
    ordered level-major, then row-major (y, x), which is the order of
    feature.flatten(2).transpose(1, 2) ([B, C, H, W] -> [B, H*W, C]) concatenated over
    levels. Returns (anchors [A, 4] xyxy float32, level index [A] int64).
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    all_anchors, all_levels = [], []
    for level, s in enumerate(strides):
        gh, gw = math.ceil(h / s), math.ceil(w / s)
        cx = (np.arange(gw, dtype=np.float32) + 0.5) * s
        cy = (np.arange(gh, dtype=np.float32) + 0.5) * s
        yy, xx = np.meshgrid(cy, cx, indexing="ij")  # [gh, gw]; row-major in (y, x)
        half = 0.5 * anchor_scale * s
        anchors = np.stack([xx - half, yy - half, xx + half, yy + half], axis=-1)
        all_anchors.append(anchors.reshape(-1, 4))
        all_levels.append(np.full(gh * gw, level, dtype=np.int64))
    if not all_anchors:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    return (
        np.concatenate(all_anchors).astype(np.float32),
        np.concatenate(all_levels),
    )


# --------------------------------------------------------------------------------- NMS


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS; returns kept indices (int64) sorted by descending score.

    A box is suppressed when its IoU with a kept, higher-scoring box is > iou_threshold
    (torchvision's rule). Each step compares the current best with all remaining boxes
    at once, so the Python loop runs once per kept box, not per pair. Equal scores keep
    their input order (stable sort), so results are deterministic.
    """
    b = _as_boxes(boxes).astype(np.float64)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if b.shape[0] != s.shape[0]:
        raise ValueError(f"{b.shape[0]} boxes but {s.shape[0]} scores")
    order = np.argsort(-s, kind="stable")
    areas = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    keep: list[int] = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        lt = np.maximum(b[i, :2], b[rest, :2])
        rb = np.minimum(b[i, 2:], b[rest, 2:])
        wh = np.clip(rb - lt, 0, None)
        inter = wh[:, 0] * wh[:, 1]
        union = areas[i] + areas[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(
    boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, iou_threshold: float
) -> np.ndarray:
    """NMS within each group (e.g. phrase), never across groups.

    Each group's boxes are shifted by group * span, where span exceeds the extent of
    all boxes, so boxes of different groups cannot overlap and one NMS pass does all
    groups. float64 keeps the shifted coordinates exact enough for many groups.
    """
    b = _as_boxes(boxes).astype(np.float64)
    g = np.asarray(groups).reshape(-1)
    if b.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    if g.shape[0] != b.shape[0]:
        raise ValueError(f"{b.shape[0]} boxes but {g.shape[0]} group ids")
    # Dense group ranks keep offsets small whatever the group ids are.
    _, rank = np.unique(g, return_inverse=True)
    lo = b.min()
    span = b.max() - lo + 1.0
    shifted = b - lo + (rank.astype(np.float64) * span)[:, None]
    return nms(shifted, scores, iou_threshold)


# --------------------------------------------------------------------------- letterbox


def letterbox_scale(orig_hw: HW, target_hw: HW) -> float:
    """Largest scale at which the image fits inside target_hw keeping its aspect ratio."""
    (h, w), (th, tw) = orig_hw, target_hw
    if min(h, w, th, tw) <= 0:
        raise ValueError(f"sizes must be positive, got orig {orig_hw} and target {target_hw}")
    return min(th / h, tw / w)


@dataclass(frozen=True)
class Letterbox:
    """How an image was placed into the model input: scaled by `scale` and pasted at the
    top-left, padding at the bottom/right only, so the mapping needs no offset.

    The resized image is round(h * scale) x round(w * scale) (resized_hw); mapping uses
    the single `scale`, which differs from the per-axis ratio by under half a pixel.
    """

    scale: float
    orig_hw: HW
    target_hw: HW

    @classmethod
    def fit(cls, orig_hw: HW, target_hw: HW, max_side: int = 0) -> "Letterbox":
        """max_side > 0 also caps the resized long side (official GLIP: MAX_SIZE_TEST 1333
        in a 800 x 1344 canvas, so landscape images get exactly the official scale)."""
        orig = (int(orig_hw[0]), int(orig_hw[1]))
        target = (int(target_hw[0]), int(target_hw[1]))
        scale = letterbox_scale(orig, target)
        if max_side > 0:
            scale = min(scale, max_side / max(orig))
        return cls(scale=scale, orig_hw=orig, target_hw=target)

    @property
    def resized_hw(self) -> HW:
        (h, w), (th, tw) = self.orig_hw, self.target_hw
        # Clamp: float rounding must never push the resized image past the canvas.
        return (
            min(th, max(1, round(h * self.scale))),
            min(tw, max(1, round(w * self.scale))),
        )

    def to_input(self, boxes: np.ndarray) -> np.ndarray:
        """Original-image pixels -> model-input pixels."""
        return (_as_boxes(boxes) * np.float32(self.scale)).astype(np.float32)

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Model-input pixels -> original-image pixels, clipped to the original image
        (boxes reaching into the padding are cut at the image border)."""
        b = _as_boxes(boxes).astype(np.float64) / self.scale
        return clip_boxes(b.astype(np.float32), self.orig_hw)
