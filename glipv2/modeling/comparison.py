"""Phrase words that compare candidates: "large star", "the square left of the hexagon".

A region embedding describes one anchor, but "large" means larger than the other stars and
"left of the hexagon" means left of wherever the hexagon is. Measured on the demo model
before this module (first 150 val images, top box per phrase): all 40 size-phrase misses
boxed another star of the phrase's shape, and 11 of 13 relation misses boxed the anchor
object itself ("the green hexagon" of "the yellow square left of the green hexagon"), whose
own words outscore the subject's in the phrase's mean.

So each token gets, after the region-token logits are known, two reference boxes: the mean
box of the anchors its own logits pick (a softmax over anchors), and, through attention over
the prompt, that of the anchors another token picks ("left" reads where "hexagon" is). A
term linear in every anchor's position and size relative to those references ranks
"larger", "further left" among the candidates.
Relative rather than absolute geometry: the large star of one image can be smaller than the
small star of another, which a per-anchor feature cannot be trained against.

Every output weight starts at zero: a model started from weights without this module
grounds exactly as they did.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from glipv2.modeling import box_ops

# cx, cy, sqrt(area) of box_ops.box_geometry: position and size (w, h add nothing that
# "large" or "left of" asks about).
_GEOMETRY = (0, 1, 4)
# Geometry differences are fractions of the image (about 0.1-0.5); scaled so that AdamW's
# per-weight steps reach logit changes of a few units within a short run.
_GAIN = 8.0


class CandidateComparison(nn.Module):
    def __init__(self, text_dim: int, attention_dim: int = 32) -> None:
        super().__init__()
        self.attention_dim = attention_dim
        # Attention over the prompt: whose reference box a token reads ("left" -> "hexagon").
        self.query = nn.Linear(text_dim, attention_dim)
        self.key = nn.Linear(text_dim, attention_dim)
        # Per token: weights on the geometry relative to its own and to the other reference.
        self.weights = nn.Linear(text_dim, 2 * len(_GEOMETRY))
        nn.init.zeros_(self.weights.weight)
        nn.init.zeros_(self.weights.bias)

    def forward(self, logits: torch.Tensor, centerness: torch.Tensor, boxes: torch.Tensor,
                image_hw: tuple[int, int], text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """logits [B, A, T] region-token logits, centerness [B, A] logits, boxes [B, A, 4]
        predicted xyxy input pixels, text [B, T, Dt] fused token features, text_mask [B, T]
        -> what is added to the logits [B, A, T]."""
        # Detached: the comparison reads the detector's picks, it does not move them.
        geometry = box_ops.box_geometry(boxes.detach(), image_hw)[..., list(_GEOMETRY)] * _GAIN  # [B, A, G]
        pick = torch.softmax((logits + centerness[..., None]).detach(), dim=1)  # over anchors
        own = pick.transpose(1, 2) @ geometry  # [B, T, G] each token's reference box

        normed = nn.functional.normalize(text, p=2, dim=-1)
        scores = self.query(normed) @ self.key(normed).transpose(1, 2) / math.sqrt(self.attention_dim)
        scores = scores.masked_fill(text_mask[:, None, :] == 0, -1e4)  # [B, T, T]
        other = torch.softmax(scores, dim=-1) @ own  # [B, T, G] the reference another token picks

        w_own, w_other = self.weights(normed).unflatten(-1, (2, len(_GEOMETRY))).unbind(-2)  # [B, T, G]
        # sum_g w_tg (x_ag - ref_tg), as a matmul without the [B, A, T, G] differences
        return (geometry @ (w_own + w_other).transpose(1, 2)
                - ((own * w_own).sum(-1) + (other * w_other).sum(-1))[:, None, :])
