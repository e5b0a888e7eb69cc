"""GLIP's DyHead tower (maskrcnn_benchmark/modeling/rpn/vldyhead.py, layers/dyrelu.py) in
plain PyTorch, with the official parameter names so official weights load by name.

One DyConv layer works on all FPN levels together (scale-aware attention): each level
mixes a deformable 3x3 conv of itself, a stride-2 deformable conv of the finer level
below and a bilinearly up-sampled deformable conv of the coarser level above, weighted
by a per-feature gate (AttnConv + hard sigmoid), then a dynamic ReLU (DyReLU). The
offsets and masks of all three convs come from one 3x3 conv of the level itself.

Two details of the official code are kept on purpose, because the released weights
were trained with them:
- the coarser level's conv receives the finer level's offset/mask tensors; the CUDA
  kernel reads them as a flat buffer sized for its own (smaller) output, i.e. the first
  18 * h * w offset values of each image (`_as_read_by_kernel`);
- the up-sampling is F.upsample_bilinear, i.e. align_corners=True.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glipv2.modeling.deform_conv import ModulatedDeformConv

_CLAMP = 50000.0  # GLIP's fp16-safe bound (CLAMP_BERTATTN_* and modeling_bert.clamp_values)


def h_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return F.relu6(x + 3.0) / 6.0


class HSigmoid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return h_sigmoid(x)


class DyReLU(nn.Module):
    """Dynamic ReLU (K2, with bias): max(x * a1 + b1, x * a2 + b2), coefficients from the
    globally pooled input, as the official DYReLU(in, out) defaults."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.channels = channels
        squeeze = channels // reduction
        self.fc = nn.Sequential(nn.Linear(channels, squeeze), nn.ReLU(inplace=True),
                                nn.Linear(squeeze, 4 * channels), HSigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x.mean(dim=(2, 3)))[:, :, None, None]  # [B, 4C, 1, 1]
        a1, b1, a2, b2 = y.split(self.channels, dim=1)
        a1 = (a1 - 0.5) * 2.0 + 1.0  # lambda_a = 2, init_a = (1, 0), init_b = (0, 0)
        a2 = (a2 - 0.5) * 2.0
        return torch.maximum(x * a1 + (b1 - 0.5), x * a2 + (b2 - 0.5))


class Conv3x3Norm(nn.Module):
    """Deformable 3x3 conv + GroupNorm (official names: conv, bn)."""

    def __init__(self, channels: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv = ModulatedDeformConv(channels, channels, 3, stride=stride, padding=1)
        self.bn = nn.GroupNorm(groups, channels)

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x, offset, mask))


def _as_read_by_kernel(t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """The first C * h * w values of each image of t [B, C, H, W], as [B, C, h, w]: what
    the official CUDA kernel reads when handed a tensor larger than its output."""
    b, c = t.shape[0], t.shape[1]
    h, w = hw
    return t.reshape(b, -1)[:, : c * h * w].reshape(b, c, h, w)


class DyConv(nn.Module):
    """One DyHead layer over all FPN levels: list of [B, C, H_l, W_l] -> same shapes."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        # Official order: [0] conv of the coarser level, [1] the level itself, [2] stride-2
        # conv of the finer level.
        self.DyConv = nn.ModuleList([Conv3x3Norm(channels, 1, groups), Conv3x3Norm(channels, 1, groups),
                                     Conv3x3Norm(channels, 2, groups)])
        self.AttnConv = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, 1, kernel_size=1),
                                      nn.ReLU(inplace=True))
        self.relu = DyReLU(channels)
        self.offset = nn.Conv2d(channels, 27, kernel_size=3, stride=1, padding=1)
        for m in [*self.DyConv.modules(), *self.AttnConv.modules()]:
            if isinstance(m, (nn.Conv2d, ModulatedDeformConv)):
                nn.init.normal_(m.weight, 0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for level, feature in enumerate(feats):
            offset_mask = self.offset(feature)
            offset, mask = offset_mask[:, :18], offset_mask[:, 18:].sigmoid()
            parts = [self.DyConv[1](feature, offset, mask)]
            if level > 0:
                parts.append(self.DyConv[2](feats[level - 1], offset, mask))
            if level < len(feats) - 1:
                coarse = feats[level + 1]
                hw = (coarse.shape[-2], coarse.shape[-1])
                up = self.DyConv[0](coarse, _as_read_by_kernel(offset, hw), _as_read_by_kernel(mask, hw))
                parts.append(F.interpolate(up, size=(feature.shape[-2], feature.shape[-1]), mode="bilinear",
                                           align_corners=True))
            stacked = torch.stack(parts)  # [n, B, C, H, W]
            gates = h_sigmoid(torch.stack([self.AttnConv(p) for p in parts]))  # [n, B, 1, 1, 1]
            out.append(self.relu((stacked * gates).mean(dim=0)))
        return out


class BertSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = (torch.matmul(q, k.transpose(-1, -2)) / self.head_dim**0.5).clamp(-_CLAMP, _CLAMP)
        # transformers' extended attention mask: (1 - mask) * the dtype's lowest value.
        scores = scores + (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        out = torch.matmul(scores.softmax(-1), v)
        return out.transpose(1, 2).reshape(b, t, d)


class _DenseNorm(nn.Module):
    def __init__(self, d_in: int, d_out: int, clamp: bool) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=1e-12)
        self.clamp = clamp

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        x = self.dense(x)
        if self.clamp:
            return self.LayerNorm(x.clamp(-_CLAMP, _CLAMP) + residual).clamp(-_CLAMP, _CLAMP)
        return self.LayerNorm(x + residual)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.self = BertSelfAttention(dim, heads)
        self.output = _DenseNorm(dim, dim, clamp=False)


class _Intermediate(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x).clamp(-_CLAMP, _CLAMP)).clamp(-_CLAMP, _CLAMP)


class BertLayer(nn.Module):
    """GLIP's BertEncoderLayer (its own modeling_bert.py, with the clamps): post-norm
    self-attention and GELU feed-forward, names as in transformers' BertLayer."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attention = _Attention(dim, heads)
        self.intermediate = _Intermediate(dim, 4 * dim)
        self.output = _DenseNorm(4 * dim, dim, clamp=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], mask [B, T] (1 = real token)."""
        att = self.attention.output(self.attention.self(x, mask), x)
        return self.output(self.intermediate(att), att)
