"""Box coding and box losses in torch (training and the exported graph).

The numpy twins used at serving time (IoU, NMS, letterbox) live in glipv2.boxes; the
decode below runs inside the graph so serving never decodes.
"""

from __future__ import annotations

import math

import torch

# GLIP/ATSS coder weights; deltas are (dx, dy, dw, dh) relative to the anchor.
WEIGHTS = (10.0, 10.0, 5.0, 5.0)
_MAX_LOG_WH = math.log(1000.0 / 16)


def _centre_size(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    w = b[..., 2] - b[..., 0]
    h = b[..., 3] - b[..., 1]
    return b[..., 0] + 0.5 * w, b[..., 1] + 0.5 * h, w, h


def per_anchor(maps: list[torch.Tensor]) -> torch.Tensor:
    """Per-level maps [B, C, h, w] -> [B, A, C], anchors level-major as the detector orders
    them (one anchor per location)."""
    return torch.cat([m.flatten(2) for m in maps], dim=2).transpose(1, 2)


def gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows idx [B, K] of t [B, A, C] -> [B, K, C] (e.g. the kept anchors' values)."""
    return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))


def box_geometry(boxes: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """xyxy input pixels [..., 4] -> [..., 5] (cx, cy, w, h, sqrt area) as fractions of the
    image (clamped to it): a box's position and size for the heads that read them."""
    h, w = image_hw
    x0, y0, x1, y1 = (boxes / boxes.new_tensor([w, h, w, h])).clamp(0, 1).unbind(-1)
    bw, bh = x1 - x0, y1 - y0
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, bw, bh, (bw * bh).sqrt()], dim=-1)


def encode(anchors: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """xyxy boxes relative to xyxy anchors -> deltas [..., 4]."""
    ax, ay, aw, ah = _centre_size(anchors)
    bx, by, bw, bh = _centre_size(boxes)
    wx, wy, ww, wh = WEIGHTS
    return torch.stack(
        [wx * (bx - ax) / aw, wy * (by - ay) / ah, ww * torch.log(bw.clamp(min=1e-3) / aw),
         wh * torch.log(bh.clamp(min=1e-3) / ah)],
        dim=-1,
    )


def decode(anchors: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Inverse of encode: deltas [..., 4] on anchors [..., 4] -> xyxy boxes."""
    ax, ay, aw, ah = _centre_size(anchors)
    wx, wy, ww, wh = WEIGHTS
    cx = ax + deltas[..., 0] / wx * aw
    cy = ay + deltas[..., 1] / wy * ah
    w = aw * torch.exp((deltas[..., 2] / ww).clamp(max=_MAX_LOG_WH))
    h = ah * torch.exp((deltas[..., 3] / wh).clamp(max=_MAX_LOG_WH))
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [N, 4], b [M, 4] xyxy -> IoU [N, M]."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-6)


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Elementwise 1 - GIoU of matching rows pred [N, 4], target [N, 4]."""
    area_p = (pred[:, 2] - pred[:, 0]).clamp(min=0) * (pred[:, 3] - pred[:, 1]).clamp(min=0)
    area_t = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    lt = torch.maximum(pred[:, :2], target[:, :2])
    rb = torch.minimum(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = (area_p + area_t - inter).clamp(min=1e-6)
    iou = inter / union
    hull = (torch.maximum(pred[:, 2:], target[:, 2:]) - torch.minimum(pred[:, :2], target[:, :2])).clamp(min=0).prod(-1)
    return 1.0 - (iou - (hull - union) / hull.clamp(min=1e-6))


def centerness_target(anchors: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """FCOS centerness of each anchor centre inside its matched box: [N]."""
    cx = (anchors[:, 0] + anchors[:, 2]) * 0.5
    cy = (anchors[:, 1] + anchors[:, 3]) * 0.5
    l, r = cx - boxes[:, 0], boxes[:, 2] - cx
    t, b = cy - boxes[:, 1], boxes[:, 3] - cy
    lr = torch.stack([l, r], -1).clamp(min=1e-6)
    tb = torch.stack([t, b], -1).clamp(min=1e-6)
    return torch.sqrt((lr.min(-1).values / lr.max(-1).values) * (tb.min(-1).values / tb.max(-1).values))
