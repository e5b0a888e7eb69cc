"""Size words that compare candidates: "large star" is the largest of the stars.

A region embedding describes one anchor, but "large" means larger than the other stars: the
large star of one image can be smaller than the small star of another, so no per-anchor
feature can be trained for it. Measured on the demo model (500 val images, top box per
phrase): size phrases without a colour ("large star") found their object 0.54 of the time
when the image's stars differ in colour, i.e. at chance, against 0.99 for "large blue star"
there, where the colour alone decides.

So each token gets, once the region-token logits are known, a reference size: the mean size
of the candidates another token of the prompt picks ("large" reads "star", by attention over
the prompt), each anchor weighted by the square of its detection score so the background's
many faint anchors weigh nothing. A learned per-token weight on every anchor's size minus
that reference ranks the candidates: positive for "large", negative for "small", zero for
words that do not compare.

Only size: an earlier form (commit c7c0a3f) also compared positions for "left of" and read
each token's own picks; on the demo model it gave size phrases +0.03-0.04 and cost relation
phrases 0.035 (README, "What was tried").

Every output weight starts at zero: a model started from weights without this module
grounds exactly as they did.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from glipv2.modeling import box_ops

_SIZE = 4  # sqrt area in box_ops.box_geometry
# Sizes are fractions of the image (sqrt area about 0.05-0.3); scaled so that AdamW's
# per-weight steps reach logit changes of a few units within a short run. With 8, the demo
# model's stage 2 (1,126 steps) learned weights of +0.39 for "large" and -0.55 for "small",
# a logit change of about 0.25 between two stars of sqrt area 0.08 and 0.16; with 32 its
# size phrases went from 0.846 to 0.894 recall@1 (README).
_GAIN = 32.0


class CandidateComparison(nn.Module):
    def __init__(self, text_dim: int, attention_dim: int = 32) -> None:
        super().__init__()
        self.attention_dim = attention_dim
        # Attention over the prompt: whose candidates a token compares against ("large" -> "star").
        self.query = nn.Linear(text_dim, attention_dim)
        self.key = nn.Linear(text_dim, attention_dim)
        self.weight = nn.Linear(text_dim, 1)  # per token: how much larger is better
        nn.init.zeros_(self.weight.weight)
        nn.init.zeros_(self.weight.bias)

    def forward(self, logits: torch.Tensor, centerness: torch.Tensor, boxes: torch.Tensor,
                image_hw: tuple[int, int], text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """logits [B, A, T] region-token logits, centerness [B, A] logits, boxes [B, A, 4]
        predicted xyxy input pixels, text [B, T, Dt] fused token features, text_mask [B, T]
        -> what is added to the logits [B, A, T]."""
        # Detached: the comparison reads the detector's picks, it does not move them.
        size = box_ops.box_geometry(boxes.detach(), image_hw)[..., _SIZE] * _GAIN  # [B, A]
        score = (torch.sigmoid(logits) * torch.sigmoid(centerness)[..., None]).detach()
        pick = score * score  # [B, A, T]
        mean_size = (pick * size[..., None]).sum(1) / pick.sum(1).clamp_min(1e-6)  # [B, T]

        normed = nn.functional.normalize(text, p=2, dim=-1)
        scores = self.query(normed) @ self.key(normed).transpose(1, 2) / math.sqrt(self.attention_dim)
        scores = scores.masked_fill(text_mask[:, None, :] == 0, -1e4)  # [B, T, T]
        reference = (torch.softmax(scores, dim=-1) @ mean_size[..., None])[..., 0]  # [B, T]

        weight = self.weight(normed)[..., 0]  # [B, T]
        return weight[:, None, :] * (size[..., None] - reference[:, None, :])
