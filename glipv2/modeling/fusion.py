"""Deep fusion: bidirectional image <-> text cross-attention, as in GLIP's VLFuse.

Parameter names follow GLIP's BiAttentionBlock (layer_norm_v/l, attn.v_proj, l_proj,
values_v_proj, values_l_proj, out_v_proj, out_l_proj, gamma_v/l).
"""

from __future__ import annotations

import torch
from torch import nn

# fp16-safe bound on attention logits, as in GLIP.
_CLAMP = 50000.0


class BiMultiHeadAttention(nn.Module):
    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim**-0.5
        self.v_proj = nn.Linear(v_dim, embed_dim)
        self.l_proj = nn.Linear(l_dim, embed_dim)
        self.values_v_proj = nn.Linear(v_dim, embed_dim)
        self.values_l_proj = nn.Linear(l_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, v_dim)
        self.out_l_proj = nn.Linear(embed_dim, l_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, N, d]

    def forward(
        self, v: torch.Tensor, l: torch.Tensor, l_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """v [B, Nv, Dv], l [B, T, Dl], l_mask [B, T] (1 = real token) -> updates for v and l."""
        b, nv, _ = v.shape
        t = l.shape[1]
        q = self._heads(self.v_proj(v)) * self.scale
        k = self._heads(self.l_proj(l))
        attn = torch.matmul(q, k.transpose(-1, -2)).clamp(-_CLAMP, _CLAMP)  # [B, H, Nv, T]

        # text -> image: every image position reads the (real) tokens.
        pad = (l_mask[:, None, None, :] == 0)
        attn_v = attn.masked_fill(pad, float("-inf")).softmax(dim=-1)
        out_v = torch.matmul(attn_v, self._heads(self.values_l_proj(l)))  # [B, H, Nv, d]
        # image -> text: every token reads all image positions.
        attn_l = attn.transpose(-1, -2).softmax(dim=-1)  # [B, H, T, Nv]
        out_l = torch.matmul(attn_l, self._heads(self.values_v_proj(v)))  # [B, H, T, d]

        out_v = out_v.transpose(1, 2).reshape(b, nv, -1)
        out_l = out_l.transpose(1, 2).reshape(b, t, -1)
        return self.out_v_proj(out_v), self.out_l_proj(out_l)


class BiAttentionBlock(nn.Module):
    """Cross-attention with layer scale on both streams.

    norm_residual=False: pre-norm, the update is added to the raw input. True: GLIP's
    BiAttentionBlockForCheckpoint, which adds the update to the LayerNorm'd input
    (v = norm(v); v = v + gamma * attn(v, l)); official weights expect that."""

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, init_scale: float,
                 norm_residual: bool = False) -> None:
        super().__init__()
        self.norm_residual = norm_residual
        self.layer_norm_v = nn.LayerNorm(v_dim)
        self.layer_norm_l = nn.LayerNorm(l_dim)
        self.attn = BiMultiHeadAttention(v_dim, l_dim, embed_dim, num_heads)
        self.gamma_v = nn.Parameter(torch.full((v_dim,), init_scale))
        self.gamma_l = nn.Parameter(torch.full((l_dim,), init_scale))

    def forward(
        self, visual: list[torch.Tensor], text: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """visual: FPN maps [B, C, H, W] per level, fused jointly as one sequence."""
        shapes = [f.shape[-2:] for f in visual]
        flat = torch.cat([f.flatten(2).transpose(1, 2) for f in visual], dim=1)  # [B, sum HW, C]
        normed_v, normed_l = self.layer_norm_v(flat), self.layer_norm_l(text)
        if self.norm_residual:
            flat, text = normed_v, normed_l
        dv, dl = self.attn(normed_v, normed_l, text_mask)
        flat = flat + self.gamma_v * dv
        text = text + self.gamma_l * dl
        out, start = [], 0
        for f, (h, w) in zip(visual, shapes):
            n = h * w
            out.append(flat[:, start:start + n].transpose(1, 2).reshape(f.shape))
            start += n
        return out, text
