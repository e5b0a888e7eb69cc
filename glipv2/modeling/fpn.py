"""Feature pyramid with the official GLIP (maskrcnn_benchmark) parameter names.

fpn_inner{i} / fpn_layer{i} for the backbone levels, top_blocks.p6 / p7 for the extra
levels of GLIP-T, so official `backbone.fpn.*` weights load by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LastLevelP6P7(nn.Module):
    def __init__(self, channels: int, num_levels: int) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(channels, channels, 3, 2, 1)
        self.p7 = nn.Conv2d(channels, channels, 3, 2, 1) if num_levels > 1 else None

    def forward(self, p5: torch.Tensor) -> list[torch.Tensor]:
        p6 = self.p6(p5)
        if self.p7 is None:
            return [p6]
        return [p6, self.p7(F.relu(p6))]


class FPN(nn.Module):
    def __init__(self, in_channels: list[int], out_channels: int, extra_levels: int = 0, first_index: int = 2) -> None:
        super().__init__()
        # first_index=2: GLIP's Swin FPN skips stage 1 (in_channels 0), so names start at 2.
        self.names = [str(first_index + i) for i in range(len(in_channels))]
        for name, cin in zip(self.names, in_channels):
            self.add_module(f"fpn_inner{name}", nn.Conv2d(cin, out_channels, 1))
            self.add_module(f"fpn_layer{name}", nn.Conv2d(out_channels, out_channels, 3, 1, 1))
        self.top_blocks = LastLevelP6P7(out_channels, extra_levels) if extra_levels else None

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        inner = getattr(self, f"fpn_inner{self.names[-1]}")(feats[-1])
        outs = [getattr(self, f"fpn_layer{self.names[-1]}")(inner)]
        for name, feat in zip(reversed(self.names[:-1]), reversed(feats[:-1])):
            lateral = getattr(self, f"fpn_inner{name}")(feat)
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            outs.insert(0, getattr(self, f"fpn_layer{name}")(inner))
        if self.top_blocks is not None:
            outs.extend(self.top_blocks(outs[-1]))
        return outs
