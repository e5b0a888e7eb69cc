"""GLIPv2 training losses: grounding, box (GIoU), centerness, inter-image region-word
contrastive, and masked language modelling. Each can be weighted or switched off."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glipv2.config import LossConfig
from glipv2.modeling import box_ops
from glipv2.modeling.glipv2 import GLIPv2, DetectorOutput
from training.batch import Batch
from training.distributed import all_gather_with_grad, all_reduce_mean, global_max
from training.targets import atss_assign, merge_duplicate_phrases


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Elementwise focal loss (Lin et al.), unreduced."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


class GLIPv2Loss:
    def __init__(self, cfg: LossConfig, anchors_per_level: list[int]) -> None:
        self.cfg = cfg
        self.anchors_per_level = anchors_per_level

    def __call__(self, model: GLIPv2, out: DetectorOutput, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        anchors = model.anchors
        b, a, t = out.logits.shape
        token_targets = out.logits.new_zeros(b, a, t)
        pos_boxes, pos_pred, pos_anchors = [], [], []
        pos_index: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (image, anchor ids, phrase sets)
        for i in range(b):
            gt = batch.boxes[i]
            matched = atss_assign(anchors, self.anchors_per_level, gt, cfg.atss_topk)
            pos = torch.nonzero(matched >= 0).squeeze(1)
            if pos.numel() == 0:
                continue
            g = matched[pos]
            phrases = merge_duplicate_phrases(gt, batch.box_phrase[i], batch.positive_map.shape[1])[g]  # [n, P]
            token_targets[i, pos] = (phrases.float() @ batch.positive_map[i] > 0).float()
            pos_boxes.append(gt[g])
            pos_pred.append(out.boxes[i, pos])
            pos_anchors.append(anchors[pos])
            pos_index.append((i, pos, phrases))

        num_pos = sum(len(p) for _, p, _ in pos_index)
        norm = all_reduce_mean(torch.tensor(float(num_pos), device=out.logits.device)).clamp(min=1.0)
        valid = batch.attention_mask[:, None, :].float()
        losses: dict[str, torch.Tensor] = {}
        if cfg.grounding > 0:
            fl = sigmoid_focal_loss(out.logits, token_targets, cfg.focal_alpha, cfg.focal_gamma)
            losses["grounding"] = cfg.grounding * (fl * valid).sum() / norm
        if num_pos:
            gt_boxes, pred, anc = torch.cat(pos_boxes), torch.cat(pos_pred), torch.cat(pos_anchors)
            ctr_target = box_ops.centerness_target(anc, gt_boxes)
            refine = cfg.box_refine > 0 and model.box_refiner is not None
            if cfg.box_giou > 0 or refine:  # both box losses are weighted by centerness
                w = all_reduce_mean(ctr_target.sum()).clamp(min=1e-6)
            if cfg.box_giou > 0:
                losses["box_giou"] = cfg.box_giou * (box_ops.giou_loss(pred, gt_boxes) * ctr_target).sum() / w
            if cfg.centerness > 0:
                ctr_pred = torch.cat([out.centerness[i, p] for i, p, _ in pos_index])
                bce = F.binary_cross_entropy_with_logits(ctr_pred, ctr_target, reduction="sum")
                losses["centerness"] = cfg.centerness * bce / norm
            if refine:
                refined = self._refined_boxes(model, batch, pos_index, pos_pred)
                losses["box_refine"] = cfg.box_refine * ((refined - gt_boxes).abs().sum(-1) * ctr_target).sum() / w
        else:  # keep every parameter in the graph so DDP's reducer sees the same set on every rank
            zero = out.boxes.sum() * 0 + out.centerness.sum() * 0
            losses["box_giou"] = zero
            losses["centerness"] = zero
            if cfg.box_refine > 0 and model.box_refiner is not None:
                losses["box_refine"] = sum(p.sum() * 0 for p in model.box_refiner.parameters())
        if cfg.contrastive > 0:
            losses["contrastive"] = cfg.contrastive * self._contrastive(model, out, batch, pos_index)
        if cfg.mlm > 0 and batch.mlm_labels is not None:
            losses["mlm"] = cfg.mlm * self._mlm(model, out, batch)
        losses["total"] = sum(losses.values())
        return losses

    def _refined_boxes(self, model: GLIPv2, batch: Batch, pos_index: list,
                       pos_pred: list[torch.Tensor]) -> torch.Tensor:
        """The positive anchors' boxes after the box refiner, concatenated like the targets.
        The refiner is given the head's boxes as they are, errors included: what it will
        be given at inference. Its loss is the L1 distance in input pixels to the objects'
        sides, weighted by centerness like the GIoU loss."""
        refiner = model.box_refiner
        images = torch.tensor([i for i, _, _ in pos_index], device=batch.images.device)
        edges = refiner.edge_maps(model.normalize(batch.images[images]))
        return torch.cat([refiner(edges[j:j + 1], pred[None], model.cfg.image_hw)[0]
                          for j, pred in enumerate(pos_pred)])

    def objectness(self, model: GLIPv2, logits: torch.Tensor, objects: list[torch.Tensor]) -> torch.Tensor:
        """Focal loss of the VQA head's class-agnostic objectness logits [B, A]: an anchor is
        an object's when ATSS would assign it to any drawn object (every object, not only the
        ones a prompt names)."""
        targets = torch.stack([(atss_assign(model.anchors, self.anchors_per_level, o, self.cfg.atss_topk) >= 0)
                               for o in objects]).to(logits.dtype)
        fl = sigmoid_focal_loss(logits, targets, self.cfg.focal_alpha, self.cfg.focal_gamma)
        norm = all_reduce_mean(targets.sum().detach()).clamp(min=1.0)
        return fl.sum() / norm

    def extreme_gate(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the VQA extremes' gate [B, 6] against the extreme that answers each
        question (index in EXTREMES; -1: none does, no loss). Zero, with the graph kept for
        DDP, when no question of the batch asks for one."""
        asked = targets >= 0
        if not bool(asked.any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits[asked], targets[asked])

    def _contrastive(self, model: GLIPv2, out: DetectorOutput, batch: Batch, pos_index: list) -> torch.Tensor:
        """GLIPv2's inter-image region-word loss: each positive region against the tokens of
        every prompt in the (global) batch. A token of another prompt is a positive when its
        phrase has the same text as one of the region's phrases ("circle" is "circle" in any
        image); everything else is a negative."""
        head = out.head
        gen = torch.Generator().manual_seed(int(batch.step_seed))
        regions, region_keys = [], []
        for i, pos, phrases in pos_index:
            keep = torch.randperm(len(pos), generator=gen)[: self.cfg.contrastive_max_regions].to(pos.device)
            regions.append(head.regions[i, pos[keep]])
            region_keys.append(phrases[keep].long() * batch.phrase_keys[i][None, :])  # [n, P], 0 = not its phrase
        # Integer arithmetic: the 31-bit keys do not survive a float32 round trip.
        token_keys = (batch.positive_map.long() * batch.phrase_keys[:, :, None]).amax(1)  # [B, T]
        # Gather every rank's tokens; pad T to the same length first (ranks may bucket differently).
        t = global_max(head.tokens.shape[1])
        all_tokens = all_gather_with_grad(_pad_tokens(head.tokens, t))
        all_bias = all_gather_with_grad(_pad_tokens(head.token_bias[..., None], t))[..., 0]
        all_keys = all_gather_with_grad(_pad_tokens(token_keys[..., None], t))[..., 0]
        all_valid = all_gather_with_grad(_pad_tokens(batch.attention_mask[..., None], t))[..., 0]
        if not regions:
            return all_tokens.sum() * 0 + head.regions.sum() * 0
        r = torch.cat(regions)  # [R, P]
        rk = torch.cat(region_keys)  # [R, Pp]
        tk = all_keys.flatten()  # [B'T]
        logits = model.head.align(r[None], all_tokens.flatten(0, 1)[None], all_bias.flatten()[None])[0]  # [R, B'T]
        target = ((rk[:, :, None] == tk[None, None, :]) & (tk != 0)[None, None, :]).any(1).float()
        fl = sigmoid_focal_loss(logits, target, self.cfg.focal_alpha, self.cfg.focal_gamma)
        valid = all_valid.flatten().float()[None, :]
        norm = all_reduce_mean(torch.tensor(float(r.shape[0]), device=r.device)).clamp(min=1.0)
        return (fl * valid).sum() / norm

    def _mlm(self, model: GLIPv2, out: DetectorOutput, batch: Batch) -> torch.Tensor:
        labels = batch.mlm_labels
        masked = labels >= 0
        if not masked.any():  # a zero that still reaches every MLM parameter (DDP needs them all)
            zero = out.head.fused_text.sum() * 0
            return zero + sum(p.sum() * 0 for p in model.mlm_head.parameters() if p.requires_grad)
        logits = model.mlm_head(out.head.fused_text[masked])
        return F.cross_entropy(logits, labels[masked])


def _pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """[B, T, C] -> [B, length, C] with zeros, so prompts of any bucket can be gathered."""
    return F.pad(x, (0, 0, 0, length - x.shape[1]))
