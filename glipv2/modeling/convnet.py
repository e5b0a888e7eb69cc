"""A small ResNet-style backbone for the "tiny" preset (trains on a CPU in minutes)."""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.act(y + self.shortcut(x))


class ConvBackbone(nn.Module):
    """Stem to stride 4, then one residual stage per stride 8, 16, 32.

    widths = (stem, stride 4, stride 8, stride 16, stride 32). Returns the stride 8/16/32
    maps, the inputs of FPN levels P3-P5.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128, 256)) -> None:
        super().__init__()
        if len(widths) != 5:
            raise ValueError(f"ConvBackbone needs 5 widths (stem, s4, s8, s16, s32), got {widths}")
        w0, w4, w8, w16, w32 = widths
        self.stem = nn.Sequential(_conv_bn(3, w0, 2), _conv_bn(w0, w4, 2))  # stride 4
        self.stage8 = nn.Sequential(BasicBlock(w4, w8, 2), BasicBlock(w8, w8, 1))
        self.stage16 = nn.Sequential(BasicBlock(w8, w16, 2), BasicBlock(w16, w16, 1))
        self.stage32 = nn.Sequential(BasicBlock(w16, w32, 2))
        self.out_channels = [w8, w16, w32]
        self.strides = [8, 16, 32]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c8 = self.stage8(self.stem(x))
        c16 = self.stage16(c8)
        c32 = self.stage32(c16)
        return [c8, c16, c32]
