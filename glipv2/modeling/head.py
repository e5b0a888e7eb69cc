"""The grounding head: deep fusion interleaved with a conv tower, then ATSS-style outputs.

Names follow GLIP's VLDyHead (bbox_pred, centerness, scales, dot_product_projection_text,
log_scale, bias_lang, bias0). Two towers: "conv" (plain 3x3 conv + GroupNorm + ReLU per
level; the tiny preset, cheap to train on a CPU) and "dyhead" (GLIP's DyConv layers with
their deformable convs in plain PyTorch, modeling/dyhead.py; the glip-t preset, so that
official weights run as trained). With cfg.fusion_text_layer, a BERT layer (GLIP's
BertEncoderLayer, official names) runs on the text after each fusion block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from glipv2.config import ModelConfig
from glipv2.modeling import box_ops
from glipv2.modeling.comparison import CandidateComparison
from glipv2.modeling.dyhead import BertLayer, DyConv
from glipv2.modeling.fusion import BiAttentionBlock

_LOGIT_CLAMP = 50000.0


class Scale(nn.Module):
    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def _tower_conv(channels: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.GroupNorm(groups, channels), nn.ReLU(inplace=True))


@dataclass
class HeadOutput:
    box_deltas: torch.Tensor  # [B, A, 4] ATSS deltas against the anchors
    centerness: torch.Tensor  # [B, A] logits
    regions: torch.Tensor  # [B, A, P] region embeddings for alignment
    tokens: torch.Tensor  # [B, T, P] projected (fused) token embeddings
    token_bias: torch.Tensor  # [B, T] per-token bias
    fused_text: torch.Tensor  # [B, T, Dt] text features after fusion (MLM reads these)


class GroundingHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c, dt = cfg.fpn_channels, cfg.text_dim
        depth = max(cfg.fusion_layers, 2)
        self.fusion = nn.ModuleList(
            BiAttentionBlock(c, dt, cfg.fusion_dim, cfg.fusion_heads, cfg.fusion_layer_scale,
                             norm_residual=cfg.fusion_norm_residual)
            for _ in range(cfg.fusion_layers)
        )
        self.text_layers = nn.ModuleList(
            BertLayer(dt, max(1, dt // 64)) for _ in range(cfg.fusion_layers if cfg.fusion_text_layer else 0)
        )
        self.dyhead = cfg.tower == "dyhead"
        self.tower = nn.ModuleList(
            DyConv(c, cfg.tower_groups) if self.dyhead else _tower_conv(c, cfg.tower_groups) for _ in range(depth)
        )
        k = cfg.head_kernel
        self.bbox_pred = nn.Conv2d(c, 4, k, 1, k // 2)
        self.centerness = nn.Conv2d(c, 1, k, 1, k // 2)
        self.scales = nn.ModuleList(Scale() for _ in cfg.strides)
        self.dot_product_projection_image: nn.Module = (
            nn.Identity() if cfg.proj_dim == c else nn.Linear(c, cfg.proj_dim)
        )
        self.dot_product_projection_text = nn.Linear(dt, cfg.proj_dim)
        self.log_scale = nn.Parameter(torch.zeros(1))
        self.bias_lang = nn.Parameter(torch.zeros(dt))
        self.bias0 = nn.Parameter(torch.tensor([cfg.bias0_init]))
        self.image_hw = cfg.image_hw
        if cfg.grounding_appearance:
            # Short paths from an anchor's colour and predicted box to its region embedding
            # (zero-initialised last layers: a model started from weights without them is
            # unchanged at step 0). Through fusion and the GroupNorm tower alone the colour
            # stayed unreadable; "large", "left of" need the box's size and place.
            p = cfg.proj_dim
            self.region_colour = nn.Sequential(nn.Linear(3, p), nn.GELU(), nn.Linear(p, p))
            self.region_geometry = nn.Sequential(nn.Linear(5, p), nn.GELU(), nn.Linear(p, p))
            for m in (self.region_colour[-1], self.region_geometry[-1]):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        else:
            self.region_colour = self.region_geometry = None
        self.candidate_comparison = CandidateComparison(dt) if cfg.grounding_comparison else None
        for m in [*([] if self.dyhead else self.tower.modules()), self.bbox_pred, self.centerness]:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor], text: torch.Tensor, text_mask: torch.Tensor) -> HeadOutput:
        for i, layer in enumerate(self.tower):
            if i < len(self.fusion):
                feats, text = self.fusion[i](feats, text, text_mask)
                if self.text_layers:
                    text = self.text_layers[i](text, text_mask)
            feats = layer(feats) if self.dyhead else [layer(f) for f in feats]

        def flat(x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, HW, C], level-major order
            return x.flatten(2).transpose(1, 2)

        deltas = torch.cat([flat(s(self.bbox_pred(f))) for f, s in zip(feats, self.scales)], dim=1)
        # [..., 0] rather than squeeze(-1): squeeze exports as an If node in ONNX
        ctr = torch.cat([flat(self.centerness(f)) for f in feats], dim=1)[..., 0]
        regions = self.dot_product_projection_image(torch.cat([flat(f) for f in feats], dim=1))
        # As in GLIP: normalised tokens (halved) are projected; bias = token . bias_lang + bias0.
        normed = nn.functional.normalize(text, p=2, dim=-1)
        tokens = self.dot_product_projection_text(normed / 2.0)
        token_bias = normed @ self.bias_lang + self.bias0
        return HeadOutput(deltas, ctr, regions, tokens, token_bias, text)

    def region_extras(self, colours: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """colours [B, A, 3] (normalised cell mean colour), boxes [B, A, 4] predicted xyxy
        input pixels -> what is added to the region embeddings [B, A, P]."""
        # Detached: the alignment loss must not move the boxes to make a phrase match.
        geometry = box_ops.box_geometry(boxes.detach(), self.image_hw)
        geometry = torch.cat([geometry[..., :2] * 2 - 1, geometry[..., 2:]], dim=-1)  # centres in -1..1
        return self.region_colour(colours) + self.region_geometry(geometry)

    def align(self, regions: torch.Tensor, tokens: torch.Tensor, token_bias: torch.Tensor) -> torch.Tensor:
        """Region-token logits: regions [B, A, P] x tokens [B, T, P] -> [B, A, T].

        Also used across the batch by the contrastive loss (regions [1, R, P] against all
        tokens [1, B*T, P]).
        """
        logits = torch.matmul(regions, tokens.transpose(-1, -2)) / self.log_scale.exp() + token_bias[:, None, :]
        return logits.clamp(-_LOGIT_CLAMP, _LOGIT_CLAMP)
