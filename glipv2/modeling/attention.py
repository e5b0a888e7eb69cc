"""Multi-head attention written out with matmul + softmax.

One implementation for the VQA head and the caption decoder. Written by hand rather than
nn.MultiheadAttention so that keys/values can be projected once and reused (the caption
decoder's cross-attention cache, its self-attention key/value cache) and so the exported
ONNX graph holds only MatMul/Softmax ops that TensorRT parses.
"""

from __future__ import annotations

import torch
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_dim: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(kv_dim or dim, dim)
        self.v_proj = nn.Linear(kv_dim or dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> [B, H, N, d]."""
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project a key/value sequence once: [B, N, Dkv] -> two [B, H, N, d]."""
        return self.split(self.k_proj(x)), self.split(self.v_proj(x))

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, Nq, D] reads k, v [B, H, Nk, d]; bias broadcasts to [B, H, Nq, Nk] (-inf = hidden)."""
        b, nq, _ = x.shape
        q = self.split(self.q_proj(x)) * self.head_dim**-0.5
        scores = torch.matmul(q, k.transpose(-1, -2))
        if bias is not None:
            scores = scores + bias
        out = torch.matmul(scores.softmax(-1), v)  # [B, H, Nq, d]
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, -1))

    def forward(self, x: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        k, v = self.keys_values(kv)
        return self.attend(x, k, v, bias)


def padding_bias(mask: torch.Tensor) -> torch.Tensor:
    """Key mask [B, N] (1 = real) -> additive bias [B, 1, 1, N]."""
    return (mask[:, None, None, :] == 0).float() * -1e4


def feed_forward(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class TransformerLayer(nn.Module):
    """Pre-norm self-attention, cross-attention, feed-forward, each residual.

    Keys and values come in already projected (`Attention.keys_values`), so the caption
    decoder can pass its caches and the VQA head its anchors."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_ff = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.cross_attn = Attention(dim, heads)
        self.ff = feed_forward(dim, 4 * dim)

    def forward(self, x: torch.Tensor, self_k: torch.Tensor, self_v: torch.Tensor, self_bias: torch.Tensor | None,
                cross_k: torch.Tensor, cross_v: torch.Tensor, cross_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn.attend(self.norm_self(x), self_k, self_v, self_bias)
        x = x + self.cross_attn.attend(self.norm_cross(x), cross_k, cross_v, cross_bias)
        return x + self.ff(self.norm_ff(x))
