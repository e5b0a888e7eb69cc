"""Swin Transformer backbone (the vision body of GLIP-T / GLIPv2-T), in plain torch.

Module and parameter names follow the official GLIP backbone
(microsoft/GLIP, ``maskrcnn_benchmark/modeling/backbone/swint.py``, itself derived
from Swin-Transformer-Object-Detection), so the ``backbone.body.*`` entries of an
official checkpoint load with ``strict=True`` once the ``module.backbone.body.``
prefix is stripped::

    patch_embed.proj.{weight,bias}            Conv2d(3, C, 4, stride 4)
    patch_embed.norm.{weight,bias}            LayerNorm(C)
    layers.{i}.blocks.{j}.norm1.{weight,bias}
    layers.{i}.blocks.{j}.attn.relative_position_bias_table   [(2w-1)^2, heads]
    layers.{i}.blocks.{j}.attn.relative_position_index        buffer [w^2, w^2] (int64)
    layers.{i}.blocks.{j}.attn.qkv.{weight,bias}
    layers.{i}.blocks.{j}.attn.proj.{weight,bias}
    layers.{i}.blocks.{j}.norm2.{weight,bias}
    layers.{i}.blocks.{j}.mlp.fc1.{weight,bias}
    layers.{i}.blocks.{j}.mlp.fc2.{weight,bias}
    layers.{i}.downsample.reduction.weight    Linear(4C_i, 2C_i, bias=False), i < last
    layers.{i}.downsample.norm.{weight,bias}  LayerNorm(4C_i)
    norm{i}.{weight,bias}                     LayerNorm(C_i) for every i in out_indices

With GLIP's ``SWINT-FPN-RETINANET`` body the stage-0 output norm is an ``nn.Identity``
(no keys) and the FPN ignores that stage, so ``out_indices=(1, 2, 3)`` reproduces the
official key set exactly.

Numerics follow the original: inputs are zero-padded on the right/bottom to a
multiple of the patch size, every block pads its token grid to a multiple of the
window size, odd blocks use a cyclic shift of ``window_size // 2`` with a 0/-100
attention mask computed over the *padded* grid, and patch merging pads odd sizes.

Everything that depends on spatial size is computed from static (Python int)
shapes, so the module traces and exports to ONNX for a fixed input size.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint
from torch import Tensor, nn

__all__ = [
    "DropPath",
    "Mlp",
    "PatchEmbed",
    "PatchMerging",
    "SwinTransformer",
    "SwinTransformerBlock",
    "BasicLayer",
    "WindowAttention",
    "relative_position_index",
    "shifted_window_mask",
    "window_partition",
    "window_reverse",
]

#: Value the official implementation puts in the attention mask between tokens that
#: come from different regions of a cyclically shifted window.
MASK_VALUE: float = -100.0


# --------------------------------------------------------------------------- helpers
def _static_int(value: int | Tensor) -> int:
    """A shape entry as a Python int.

    Under ``torch.jit.trace`` (the TorchScript ONNX exporter) shape entries are 0-d
    tensors; turning them into ints bakes the spatial sizes into the graph as
    constants, which is what a fixed-input-size export wants and keeps every reshape
    static. Batch dimensions are never read this way (they stay ``-1``).
    """
    if isinstance(value, Tensor):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return int(value)
    return int(value)


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
    """Stochastic depth: zero whole samples of a residual branch with prob ``drop_prob``.

    Kept samples are scaled by ``1 / (1 - drop_prob)`` so the expectation is unchanged.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep_prob)
    return x * mask / keep_prob


class DropPath(nn.Module):
    """Stochastic depth per sample (applied to the main path of residual blocks)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """``[B, H, W, C]`` (H, W multiples of ``window_size``) -> ``[B * nW, ws * ws, C]``.

    Windows are ordered row-major over the window grid, batch-major overall.
    """
    h, w, c = (_static_int(v) for v in x.shape[1:])
    x = x.view(-1, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, c)


def window_reverse(windows: Tensor, window_size: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``[B * nW, ws * ws, C]`` -> ``[B, H, W, C]``."""
    c = _static_int(windows.shape[-1])
    x = windows.view(-1, height // window_size, width // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def relative_position_index(window_size: int) -> Tensor:
    """Index into the relative position bias table for every (query, key) token pair.

    Returns an int64 ``[ws * ws, ws * ws]`` tensor whose entries lie in
    ``[0, (2 * ws - 1) ** 2)``; identical to the buffer stored in official checkpoints.
    """
    coords = torch.stack(
        torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    ).flatten(1)  # [2, N]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [N, N, 2]: (dy, dx)
    dy = rel[..., 0] + (window_size - 1)
    dx = rel[..., 1] + (window_size - 1)
    return (dy * (2 * window_size - 1) + dx).contiguous()


def _region_ids(length: int, window_size: int, shift_size: int, device: torch.device) -> Tensor:
    """Region of each padded coordinate after the cyclic shift: 0, 1 or 2.

    Matches the slices ``[0, L - ws)``, ``[L - ws, L - shift)``, ``[L - shift, L)``
    of the original implementation (the first one may be empty).
    """
    pos = torch.arange(length, device=device)
    return (pos >= length - window_size).long() + (pos >= length - shift_size).long()


def shifted_window_mask(
    height: int,
    width: int,
    window_size: int,
    shift_size: int,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Additive attention mask for shifted windows over a padded ``height x width`` grid.

    ``height`` and ``width`` must be multiples of ``window_size``. Returns
    ``[nW, ws * ws, ws * ws]`` with 0 where query and key come from the same region of
    the rolled feature map and ``-100`` elsewhere. Built from static sizes with tensor
    ops only (no data-dependent control flow), so it traces to constants.
    """
    device = torch.device("cpu") if device is None else device
    h_id = _region_ids(height, window_size, shift_size, device)
    w_id = _region_ids(width, window_size, shift_size, device)
    img = (h_id[:, None] * 3 + w_id[None, :]).to(dtype)  # [Hp, Wp], 9 region labels
    windows = window_partition(img[None, :, :, None], window_size).squeeze(-1)  # [nW, N]
    diff = windows[:, None, :] - windows[:, :, None]  # [nW, N, N]
    return (diff != 0).to(dtype) * MASK_VALUE


# --------------------------------------------------------------------------- modules
class Mlp(nn.Module):
    """Two-layer feed-forward network with GELU (``fc1`` -> GELU -> ``fc2``)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window, with a learned relative position bias."""

    relative_position_index: Tensor

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5

        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        # Persistent: official checkpoints carry this buffer, strict loading needs it.
        self.register_buffer("relative_position_index", relative_position_index(window_size))

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> Tensor:
        """``[num_heads, N, N]`` bias gathered from the table (N = window_size ** 2)."""
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x``: ``[B * nW, N, C]``; ``mask``: ``[nW, N, N]`` additive (0 / -100) or None."""
        n, c = _static_int(x.shape[1]), _static_int(x.shape[2])
        head_dim = c // self.num_heads
        qkv = self.qkv(x).reshape(-1, n, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B*nW, heads, N, head_dim]

        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn + self.relative_position_bias().unsqueeze(0)
        if mask is not None:
            nw = _static_int(mask.shape[0])
            attn = attn.view(-1, nw, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(-1, self.num_heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))

        x = (attn @ v).transpose(1, 2).reshape(-1, n, c)
        return self.proj_drop(self.proj(x))


class SwinTransformerBlock(nn.Module):
    """(Shifted) window attention + MLP, both pre-norm residual branches."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError("shift_size must be in [0, window_size)")
        self.dim = dim
        self.window_size = window_size
        self.shift_size = shift_size

        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(
            dim, window_size, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: Tensor, height: int, width: int, attn_mask: Tensor | None) -> Tensor:
        """``x``: ``[B, H*W, C]`` tokens of an ``height x width`` grid.

        ``attn_mask`` is the shifted-window mask of the padded grid; it is used only when
        this block shifts.
        """
        length, c = _static_int(x.shape[1]), _static_int(x.shape[2])
        if length != height * width:
            raise ValueError(f"got {length} tokens for a {height}x{width} grid")
        ws = self.window_size

        shortcut = x
        x = self.norm1(x).view(-1, height, width, c)

        pad_r = (ws - width % ws) % ws
        pad_b = (ws - height % ws) % ws
        if pad_r > 0 or pad_b > 0:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = height + pad_b, width + pad_r

        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
            mask = attn_mask
        else:
            mask = None

        windows = self.attn(window_partition(x, ws), mask=mask)
        x = window_reverse(windows, ws, hp, wp)

        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        if pad_r > 0 or pad_b > 0:
            x = x[:, :height, :width, :]
        x = x.reshape(-1, height * width, c)

        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat (4C) -> LayerNorm -> Linear to 2C: halves the resolution."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        """``[B, H*W, C]`` -> ``[B, ceil(H/2)*ceil(W/2), 2C]`` (odd sizes are zero-padded)."""
        length, c = _static_int(x.shape[1]), _static_int(x.shape[2])
        if length != height * width:
            raise ValueError(f"got {length} tokens for a {height}x{width} grid")
        x = x.view(-1, height, width, c)
        if height % 2 == 1 or width % 2 == 1:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        # Channel order x0, x1, x2, x3 matters for the pretrained reduction weights.
        x0 = x[:, 0::2, 0::2, :]
        x1 = x[:, 1::2, 0::2, :]
        x2 = x[:, 0::2, 1::2, :]
        x3 = x[:, 1::2, 1::2, :]
        tokens = ((height + 1) // 2) * ((width + 1) // 2)
        x = torch.cat([x0, x1, x2, x3], dim=-1).reshape(-1, tokens, 4 * c)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    """One Swin stage: ``depth`` blocks alternating W-MSA / SW-MSA, then optional merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] | float = 0.0,
        downsample: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        if isinstance(drop_path, (int, float)):
            rates = [float(drop_path)] * depth
        else:
            rates = [float(r) for r in drop_path]
        if len(rates) != depth:
            raise ValueError(f"need {depth} drop-path rates, got {len(rates)}")

        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim=dim,
                num_heads=num_heads,
                window_size=window_size,
                shift_size=0 if i % 2 == 0 else self.shift_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop,
                attn_drop=attn_drop,
                drop_path=rates[i],
            )
            for i in range(depth)
        )
        self.downsample: PatchMerging | None = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, int, int]:
        """Returns ``(stage_output, next_stage_input, next_height, next_width)``.

        ``stage_output`` is ``[B, H*W, C]``; without a downsample layer the second
        element is the same tensor and the size is unchanged.
        """
        ws = self.window_size
        attn_mask: Tensor | None = None
        if self.shift_size > 0 and self.depth > 1:
            hp = -(-height // ws) * ws
            wp = -(-width // ws) * ws
            attn_mask = shifted_window_mask(hp, wp, ws, self.shift_size, x.device, x.dtype)

        for blk in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = torch_checkpoint.checkpoint(
                    blk, x, height, width, attn_mask, use_reentrant=False
                )
            else:
                x = blk(x, height, width, attn_mask)

        if self.downsample is None:
            return x, x, height, width
        return x, self.downsample(x, height, width), (height + 1) // 2, (width + 1) // 2


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` conv embedding followed by LayerNorm."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B, C, ceil(H/p), ceil(W/p)]`` (right/bottom zero padding)."""
        h, w = _static_int(x.shape[2]), _static_int(x.shape[3])
        p = self.patch_size
        pad_r = (p - w % p) % p
        pad_b = (p - h % p) % p
        if pad_r > 0 or pad_b > 0:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        x = self.proj(x)
        hh, ww = _static_int(x.shape[2]), _static_int(x.shape[3])
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x.transpose(1, 2).reshape(-1, self.embed_dim, hh, ww)


class SwinTransformer(nn.Module):
    """Swin Transformer backbone returning multi-scale feature maps.

    Args:
        embed_dim: channels of stage 0; stage ``i`` has ``embed_dim * 2 ** i``.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: attention window (tokens per side).
        mlp_ratio: MLP hidden width / channels.
        drop_path_rate: stochastic depth rate, linearly increasing over all blocks
            from 0 to this value (GLIP-T uses 0.2).
        out_indices: stages whose (LayerNorm-ed) outputs ``forward`` returns.
        patch_size: patch embedding stride (stage ``i`` has stride ``patch_size * 2 ** i``).
        in_chans: input channels.
        use_checkpoint: gradient checkpointing of every block while training.

    Attributes:
        out_channels: channels of each returned map, in ``out_indices`` order.
        strides: stride (input pixels per output cell) of each returned map.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.2,
        out_indices: Sequence[int] = (1, 2, 3),
        patch_size: int = 4,
        in_chans: int = 3,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        depths = tuple(int(d) for d in depths)
        num_heads = tuple(int(h) for h in num_heads)
        if len(depths) != len(num_heads):
            raise ValueError("depths and num_heads must have the same length")
        num_layers = len(depths)
        out_indices = tuple(sorted(int(i) for i in out_indices))
        if not out_indices or any(i < 0 or i >= num_layers for i in out_indices):
            raise ValueError(f"out_indices {out_indices} must be within [0, {num_layers})")

        self.embed_dim = embed_dim
        self.depths = depths
        self.num_heads = num_heads
        self.window_size = window_size
        self.patch_size = patch_size
        self.num_layers = num_layers
        self.out_indices = out_indices
        self.num_features = [embed_dim * 2**i for i in range(num_layers)]
        self.out_channels: list[int] = [self.num_features[i] for i in out_indices]
        self.strides: list[int] = [patch_size * 2**i for i in out_indices]

        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)

        total = sum(depths)
        dpr = [drop_path_rate * k / (total - 1) if total > 1 else 0.0 for k in range(total)]
        self.layers = nn.ModuleList()
        start = 0
        for i in range(num_layers):
            self.layers.append(
                BasicLayer(
                    dim=self.num_features[i],
                    depth=depths[i],
                    num_heads=num_heads[i],
                    window_size=window_size,
                    mlp_ratio=mlp_ratio,
                    drop_path=dpr[start : start + depths[i]],
                    downsample=i < num_layers - 1,
                    use_checkpoint=use_checkpoint,
                )
            )
            start += depths[i]

        for i in out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``[B, in_chans, H, W]`` -> one ``[B, C_i, H_i, W_i]`` map per out index.

        ``H_0 = ceil(H / patch_size)`` and every later stage halves with rounding up.
        """
        x = self.patch_embed(x)
        height, width = _static_int(x.shape[2]), _static_int(x.shape[3])
        x = x.flatten(2).transpose(1, 2)

        outs: list[Tensor] = []
        last = self.out_indices[-1]
        for i, layer in enumerate(self.layers):
            stage_out, x, next_h, next_w = layer(x, height, width)
            if i in self.out_indices:
                y = getattr(self, f"norm{i}")(stage_out)
                c = self.num_features[i]
                outs.append(y.view(-1, height, width, c).permute(0, 3, 1, 2).contiguous())
            if i == last:
                break
            height, width = next_h, next_w
        return outs
