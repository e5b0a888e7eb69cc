"""ATSS anchor assignment and per-anchor training targets."""

from __future__ import annotations

import torch

from glipv2.modeling.box_ops import pairwise_iou


def atss_assign(anchors: torch.Tensor, anchors_per_level: list[int], gt: torch.Tensor, topk: int = 9) -> torch.Tensor:
    """Match anchors [A, 4] to ground-truth boxes [N, 4] (ATSS, Zhang et al. 2020).

    Per box: the topk anchors of each level closest by centre are candidates; those whose
    IoU reaches mean + std of the candidates' IoUs, with their centre inside the box, are
    positives. An anchor claimed by several boxes goes to the one it overlaps most.
    Returns the matched box index per anchor, -1 for background.
    """
    a = anchors.shape[0]
    if gt.shape[0] == 0:
        return torch.full((a,), -1, dtype=torch.long, device=anchors.device)
    iou = pairwise_iou(anchors, gt)  # [A, N]
    a_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    g_ctr = (gt[:, :2] + gt[:, 2:]) / 2
    dist = torch.cdist(a_ctr, g_ctr)  # [A, N]

    candidates, start = [], 0
    for n in anchors_per_level:
        k = min(topk, n)
        candidates.append(dist[start:start + n].topk(k, dim=0, largest=False).indices + start)
        start += n
    cand = torch.cat(candidates, dim=0)  # [L*k, N]
    cand_iou = iou.gather(0, cand)
    threshold = cand_iou.mean(0) + cand_iou.std(0, unbiased=True if cand.shape[0] > 1 else False)
    cx, cy = a_ctr[cand, 0], a_ctr[cand, 1]  # [L*k, N]
    inside = (cx > gt[:, 0]) & (cx < gt[:, 2]) & (cy > gt[:, 1]) & (cy < gt[:, 3])
    positive = (cand_iou >= threshold[None]) & inside

    pos_mask = torch.zeros_like(iou, dtype=torch.bool).scatter_(0, cand, positive)
    claimed = torch.where(pos_mask, iou, torch.full_like(iou, -1.0))
    best_iou, best = claimed.max(dim=1)
    return torch.where(best_iou >= 0, best, torch.full_like(best, -1))


def merge_duplicate_phrases(gt: torch.Tensor, box_phrase: torch.Tensor, num_phrases: int) -> torch.Tensor:
    """[N, P] bool: the phrases each ground-truth object answers to.

    A grounding prompt may name one object with two phrases ("red circle. large circle."),
    which arrives as two identical boxes; whichever of them an anchor matches, all the
    object's phrases are its positives, so the targets never contradict each other.
    """
    own = torch.nn.functional.one_hot(box_phrase, num_phrases).bool()  # [N, P]
    if gt.shape[0] == 0:
        return own
    same = pairwise_iou(gt, gt) > 0.95  # [N, N]
    return (same.float() @ own.float()) > 0
