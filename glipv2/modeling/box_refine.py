"""Box refinement: each side of a box moved by what a fine edge map shows across it.

Why: the head regresses boxes from stride-8 and coarser maps. On the shapes world its
boxes are about one input pixel off per side (mean absolute error 0.5-1.5 px), which
held COCO AP at 0.857 with AP50 at 0.99: AP at IoU 0.90 was 0.65, at 0.95 0.20. Perfect
boxes would have given 0.99, perfect ranking only 0.87. Looking at each side again on a
finer map is what cascade refinement (Cai & Vasconcelos 2018) and side-aware boundary
localisation (Wang et al. 2020) do for the same reason.

A small convolution stack reads the normalised image at stride 2 (`edge_maps`). Each
side of a box samples it on a strip across that side: `along` points spread over the
side, ends included (a triangle's or star's extreme point can be a corner), times
`across` points one input pixel apart, centred on the side. A per-side MLP reads the
strip and moves the side outward by its output, in input pixels. The boxes come in
detached: the refinement learns from its own loss and leaves the head's training as it
was. Its last layer starts at zero, so a model started without it boxes as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BoxRefiner(nn.Module):
    def __init__(self, channels: int = 8, along: int = 5, across: int = 9, hidden: int = 32) -> None:
        super().__init__()
        if along < 2 or across < 1:
            raise ValueError(f"BoxRefiner needs along >= 2 and across >= 1, got {along}, {across}")
        self.along, self.across = along, across
        self.edges = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(16, channels, 3, 1, 2, dilation=2),
        )
        features = channels * along * across
        # One MLP per side, as batched weights: a conv map answers a vertical edge in other
        # channels than a horizontal one, so the sides cannot share weights.
        self.w1 = nn.Parameter(torch.randn(4, features, hidden) * features ** -0.5)
        self.b1 = nn.Parameter(torch.zeros(4, 1, hidden))
        self.w2 = nn.Parameter(torch.zeros(4, hidden, 1))
        self.b2 = nn.Parameter(torch.zeros(4, 1, 1))
        u = torch.linspace(0.0, 1.0, along)
        t = torch.arange(across, dtype=torch.float32) - (across - 1) / 2
        self.register_buffer("u", u, persistent=False)
        self.register_buffer("t", t, persistent=False)

    def edge_maps(self, normalized: torch.Tensor) -> torch.Tensor:
        """Normalised image [B, 3, H, W] (GLIPv2.normalize) -> edge maps [B, C, H/2, W/2]."""
        return self.edges(normalized)

    def strip_points(self, boxes: torch.Tensor) -> torch.Tensor:
        """boxes [B, N, 4] xyxy -> sample points [B, N, 4 sides, along, across, 2] (x, y),
        in input pixels; along each strip the points run outward from the box."""
        x0, y0, x1, y1 = boxes.unbind(-1)
        u, t = self.u, self.t.to(boxes.dtype)
        ys = y0[..., None] + u * (y1 - y0)[..., None]  # [B, N, along]: down a vertical side
        xs = x0[..., None] + u * (x1 - x0)[..., None]  # across a horizontal side

        def strip(pos_along: torch.Tensor, side: torch.Tensor, sign: float, vertical: bool) -> torch.Tensor:
            a = pos_along[..., :, None].expand(*pos_along.shape, self.across)
            c = (side[..., None, None] + sign * t).expand_as(a)
            return torch.stack([c, a] if vertical else [a, c], dim=-1)

        return torch.stack([strip(ys, x0, -1.0, True), strip(xs, y0, -1.0, False),
                            strip(ys, x1, 1.0, True), strip(xs, y1, 1.0, False)], dim=2)

    def sample_strips(self, edges: torch.Tensor, boxes: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """edges [B, C, h, w] from `edge_maps`, boxes [B, N, 4] xyxy input pixels -> the edge
        maps read at `strip_points` [B, N, 4 sides, C, along * across]."""
        b, n = boxes.shape[:2]
        h, w = image_hw
        pts = self.strip_points(boxes.detach())
        # grid_sample's align_corners=False: -1 and 1 are the image's outer pixel edges, at
        # any stride, so input pixels map the same way onto the stride-2 map. In float32
        # even under autocast: a bfloat16 grid would be a pixel off at 256 px.
        scale = pts.new_tensor([2.0 / w, 2.0 / h])
        grid = (pts.float() * scale.float() - 1).reshape(b, n * 4 * self.along, self.across, 2)
        sampled = F.grid_sample(edges.float(), grid, mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # [B, C, N*4*along, across]
        c = sampled.shape[1]
        return sampled.reshape(b, c, n, 4, self.along * self.across).permute(0, 2, 3, 1, 4)

    def forward(self, edges: torch.Tensor, boxes: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """edges [B, C, h, w] from `edge_maps`, boxes [B, N, 4] xyxy input pixels -> refined
        boxes [B, N, 4]."""
        b, n = boxes.shape[:2]
        strips = self.sample_strips(edges, boxes, image_hw)
        strips = strips.reshape(b * n, 4, 1, -1).transpose(0, 1)  # [4 sides, B*N, 1, features]
        hidden = F.relu(torch.matmul(strips, self.w1[:, None]) + self.b1[:, None])
        out = torch.matmul(hidden, self.w2[:, None]) + self.b2[:, None]  # [4, B*N, 1, 1]
        outward = out.reshape(4, b, n).permute(1, 2, 0).float()  # [B, N, 4 sides]
        sign = outward.new_tensor([-1.0, -1.0, 1.0, 1.0])
        return boxes.detach().float() + sign * outward
