"""torchrun helpers: rank detection, reductions and a gradient-preserving all_gather."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the process group when launched by torchrun (RANK set); otherwise run alone."""
    if "RANK" not in os.environ:
        return DistInfo(0, 1, 0)
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return info


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / dist.get_world_size()


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x [N, ...] from every rank along dim 0; gradients flow to the local part.

    Ranks may hold different N: sizes are exchanged first and tensors padded.
    """
    if not is_distributed():
        return x
    world, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_i = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(sizes_i), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x.detach()
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    parts = [p[:s] for p, s in zip(parts, sizes_i)]
    parts[rank] = x
    return torch.cat(parts, dim=0)


def global_max(value: int) -> int:
    """The largest of an int across ranks (e.g. the longest padded prompt)."""
    if not is_distributed():
        return value
    x = torch.tensor([value])
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return int(x.item())
