"""Modulated deformable convolution (DCNv2) in plain PyTorch: grid_sample, then a matmul.

GLIP's DyHead runs its 3x3 convolutions through a compiled CUDA op
(maskrcnn_benchmark/csrc/cuda/deform_conv_kernel_cuda.cu) that has no CPU path and no
ONNX export. This module computes the same thing from standard ops, so it runs on a CPU,
exports to ONNX (GridSample, opset >= 16) and parses in TensorRT:

    out[b, o, y, x] = bias[o] + sum_{c, tap} weight[o, c, tap]
                      * mask[b, tap, y, x] * bilinear(input[b, c], py, px)
    py = y * stride - padding + i * dilation + offset[b, 2 * tap, y, x]
    px = x * stride - padding + j * dilation + offset[b, 2 * tap + 1, y, x]

with tap = i * kw + j, offsets interleaved (dy, dx) per tap as the official kernel reads
them, and samples outside the input contributing zero (the kernel's bilinear drops each
out-of-range corner; grid_sample's padding_mode="zeros" does the same).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def modulated_deform_conv2d(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
) -> torch.Tensor:
    """x [B, C, H, W], offset [B, 2K, Ho, Wo], mask [B, K, Ho, Wo], weight [O, C, kh, kw]
    (K = kh * kw, one deformable group, one conv group) -> [B, O, Ho, Wo]."""
    b, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    k = kh * kw
    ho, wo = offset.shape[-2], offset.shape[-1]
    # Sampling positions [B, K, Ho, Wo] in input pixels.
    ys = torch.arange(ho, dtype=x.dtype, device=x.device) * stride - padding
    xs = torch.arange(wo, dtype=x.dtype, device=x.device) * stride - padding
    ti = torch.arange(kh, dtype=x.dtype, device=x.device) * dilation
    tj = torch.arange(kw, dtype=x.dtype, device=x.device) * dilation
    tap_y = ti[:, None].expand(kh, kw).reshape(k)
    tap_x = tj[None, :].expand(kh, kw).reshape(k)
    off = offset.reshape(b, k, 2, ho, wo)
    py = ys[None, None, :, None] + tap_y[None, :, None, None] + off[:, :, 0]
    px = xs[None, None, None, :] + tap_x[None, :, None, None] + off[:, :, 1]
    # align_corners=False: pixel p sits at normalised (2p + 1) / size - 1 (also valid
    # for a 1-pixel axis, where align_corners=True would divide by zero).
    grid = torch.stack([(2 * px + 1) / w - 1, (2 * py + 1) / h - 1], dim=-1)  # [B, K, Ho, Wo, 2]
    sampled = F.grid_sample(x, grid.reshape(b, k * ho, wo, 2), mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # [B, C, K*Ho, Wo]
    sampled = sampled * mask.reshape(b, 1, k * ho, wo)
    cols = sampled.reshape(b, c * k, ho * wo)  # rows ordered (channel, tap) like weight.flatten(1)
    out = torch.matmul(weight.reshape(o, c * k), cols)  # [B, O, Ho*Wo]
    if bias is not None:
        out = out + bias[None, :, None]
    return out.reshape(b, o, ho, wo)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    return (size + 2 * padding - (dilation * (kernel - 1) + 1)) // stride + 1


class ModulatedDeformConv(nn.Module):
    """Parameters named and initialised as maskrcnn_benchmark's ModulatedDeformConv
    (weight [O, C, k, k], bias [O]), so official weights load by name."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, dilation: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)

    def output_size(self, hw: tuple[int, int]) -> tuple[int, int]:
        return tuple(conv_output_size(s, self.kernel_size, self.stride, self.padding, self.dilation)
                     for s in hw)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return modulated_deform_conv2d(x, offset, mask, self.weight, self.bias, self.stride, self.padding,
                                       self.dilation)
