"""VQA head: answers a question from the fused image-question features (GLIPv2's VQA task).

The question is the prompt of an ordinary detector pass, so deep fusion has already
conditioned every anchor on it and every anchor has region-token alignment logits. The
head reads that pass:
- queries: a learned [ANSWER] token plus the fused question tokens;
- keys: every anchor, as its region embedding + its appearance (the FPN feature at its
  location and the cell's mean colour, see GLIPv2.appearance) + its predicted box
  (position and size, for "left of" and "largest") + its alignment summary (how well it
  matches the question);
- two layers of (query self-attention, cross-attention to the anchors, feed-forward). A
  question token's cross-attention is biased by the log of its detection score, so
  "star" reads the star's anchors from the first step on: learning to find
  30 anchors of 1,344 from uniform attention was too slow to happen in a CPU budget (the
  first demo run answered every colour question with the prior);
- the subject's appearance: anchors pooled by their best question token's (sharpened)
  detection score, fed to the classifier unprojected (with only the attention path,
  colour questions stayed at the prior after 1,150 steps);
- counting features: softmax attention averages, so "how many" gets its own signal from
  the peaks of each token's score map (3x3 max-pool peak picking, as CenterNet does
  instead of NMS), weighted by a learned per-token weight: their score mass, and
  (`ModelConfig.vqa_count_thresholds`) soft counts of the peaks above learned scores, per
  level, summed and the most of any level. The mass alone never told two objects from one:
  the background's many low peaks (0.01-0.05) outweighed an object's 0.3-0.4, and the head
  answered every count of 2 or more with 1.
- extremes (`ModelConfig.vqa_extremes`): the objects furthest left, right, up and down,
  the largest and the smallest, each pooled from the anchors by a softmax of an objectness
  logit plus that coordinate, one of them chosen by a gate from the question. "What
  shape is left of the red circle?" is always answered by the leftmost object (the
  generator only asks it when every object on that side has one shape), and "the largest
  object" is an extreme too; the attention path alone left relation questions at chance.
  The objectness logit is trained on every drawn object (training/train.py, loss
  "objectness"), so it is class-agnostic: the question's prompt names at most one of them;
  the gate is trained on the extreme that answers the question where the data knows it
  (loss "extreme_gate").
The [ANSWER] output and the counts give one logit per answer of the vocabulary (VQA v2
style multi-label: trained with binary cross-entropy against soft scores).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from glipv2.config import ModelConfig
from glipv2.modeling import box_ops
from glipv2.modeling.attention import TransformerLayer, padding_bias


class ExtremeLogits(NamedTuple):
    """What the extremes' training losses read: objectness [B, A] (every drawn object) and
    the gate [B, 6] (which extreme the question asks for, in `EXTREMES` order)."""

    objectness: torch.Tensor
    gate: torch.Tensor


# How sharply a peak's score crosses a count threshold: at 50, a peak 0.1 above counts 0.99
# and one 0.17 below (background, about 0.03 against 0.2) counts 0.0002.
COUNT_SHARPNESS = 50.0

# The order of Extremes' coordinates, its gate's outputs and its training targets
# (training.shapes_world.question_extreme).
EXTREMES: tuple[str, ...] = ("leftmost", "rightmost", "topmost", "bottommost", "largest", "smallest")


def extreme_coordinates(geometry: torch.Tensor) -> torch.Tensor:
    """[..., A, 5] (cx, cy, w, h, sqrt area; 0..1) -> [..., 6, A]: per extreme of `EXTREMES`,
    a coordinate that is highest for the object furthest that way."""
    cx, cy, size = geometry[..., 0], geometry[..., 1], geometry[..., 4]
    return torch.stack([-cx, cx, -cy, cy, size, -size], dim=-2)


def norm_look(look: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """[..., C + 3] pooled appearance: the mean colour (3 channels, already normalised)
    bypasses the LayerNorm, in which 64 feature channels would drown it."""
    c = look.shape[-1] - 3
    return torch.cat([norm(look[..., :c]), look[..., c:]], dim=-1)


class VqaHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.vqa_dim
        self.image_hw = cfg.image_hw
        self.level_hw = cfg.level_hw
        self.answer_query = nn.Parameter(torch.zeros(1, 1, d))
        self.question_proj = nn.Linear(cfg.text_dim, d)
        self.region_proj = nn.Linear(cfg.proj_dim, d)
        self.visual_proj = nn.Linear(cfg.fpn_channels + 3, d)
        self.geometry_proj = nn.Linear(5, d)
        self.match_proj = nn.Linear(3, d)
        self.anchor_norm = nn.LayerNorm(d)
        self.layers = nn.ModuleList(TransformerLayer(d, 4) for _ in range(cfg.vqa_layers))
        self.token_weight = nn.Linear(cfg.text_dim, 1)
        self.norm = nn.LayerNorm(d)
        self.grounding_scale = nn.Parameter(torch.tensor(8.0))
        self.norm_tokens = nn.LayerNorm(d)
        self.norm_grounded = nn.LayerNorm(cfg.fpn_channels)
        levels = len(cfg.strides)
        # Stored as logits: the thresholds stay scores in (0, 1) while they learn.
        thresholds = torch.tensor(cfg.vqa_count_thresholds, dtype=torch.float32)
        self.count_thresholds = nn.Parameter(torch.logit(thresholds)) if len(thresholds) else None
        n_count = levels + 1 + len(thresholds) * (levels + 2)
        look = cfg.fpn_channels + 3
        self.extremes = Extremes(d, cfg.fpn_channels) if cfg.vqa_extremes else None
        n_in = 2 * d + look + n_count + (look + d if self.extremes is not None else 0)
        self.classifier = nn.Sequential(nn.Linear(n_in, 2 * d), nn.GELU(), nn.Linear(2 * d, len(cfg.vqa_answers)))

    def forward(self, looks: list[torch.Tensor], boxes: torch.Tensor, logits: torch.Tensor, centerness: torch.Tensor,
                regions: torch.Tensor, fused_text: torch.Tensor, text_mask: torch.Tensor,
                with_extremes: bool = False) -> torch.Tensor | tuple[torch.Tensor, ExtremeLogits]:
        """FPN maps + detector outputs for the question prompt -> answer logits [B, num_answers]
        (and, with_extremes, the extremes' objectness and gate logits for their training losses).

        looks: appearance maps [B, C + 3, H, W] (anchors are their locations, level-major), boxes
        [B, A, 4] input pixels, logits [B, A, T], centerness [B, A], regions [B, A, P],
        fused_text [B, T, Dt], text_mask [B, T]."""
        real = text_mask[:, None, :] > 0
        scores = logits.sigmoid() * centerness.sigmoid()[..., None] * real  # [B, A, T]
        match = torch.stack([
            logits.masked_fill(~real, -1e4).amax(-1).clamp(min=-20.0),
            (logits * real).sum(-1) / real.sum(-1).clamp(min=1),
            centerness,
        ], dim=-1)
        visual = box_ops.per_anchor(looks)  # [B, A, C + 3]
        geometry = box_ops.box_geometry(boxes, self.image_hw)
        anchors = self.anchor_norm(self.region_proj(regions) + self.visual_proj(visual)
                                   + self.geometry_proj(geometry) + self.match_proj(match))
        b = boxes.shape[0]
        question = self.question_proj(fused_text)
        q = torch.cat([self.answer_query.expand(b, -1, -1), question], dim=1)
        q_mask = torch.cat([text_mask.new_ones(b, 1), text_mask], dim=1)
        bias = padding_bias(q_mask)
        # [ANSWER] attends freely; token t starts from where it is grounded.
        # log of the detection score sigmoid(logit) * sigmoid(centerness): attention in
        # proportion to how well the anchor is the token's object
        log_score = nn.functional.logsigmoid(logits) + nn.functional.logsigmoid(centerness)[..., None]
        # Sharpened: the object's anchors score only a few nats above the 1,300 background
        # ones, which together would outweigh it in a plain softmax (measured).
        token_bias = (log_score.clamp(min=-30.0) * self.grounding_scale).transpose(1, 2)  # [B, T, A]
        grounding = torch.cat([torch.zeros_like(token_bias[:, :1]), token_bias], dim=1)[:, None]
        for layer in self.layers:
            self_k, self_v = layer.self_attn.keys_values(layer.norm_self(q))
            cross_k, cross_v = layer.cross_attn.keys_values(anchors)
            q = layer(q, self_k, self_v, bias, cross_k, cross_v, grounding)
        weights = self._token_weights(fused_text, text_mask)  # [B, T]
        tokens = (q[:, 1:] * weights[..., None]).sum(1)
        # The subject's appearance, unprojected: anchors pooled by their best question
        # token's detection score (the named shape outscores the question's other words).
        # A short linear path from colour to answer.
        subject = token_bias.masked_fill(text_mask[..., None] == 0, -1e4).amax(1)  # [B, A]: best token per anchor
        grounded = torch.matmul(subject.softmax(-1)[:, None], visual)[:, 0]  # [B, C + 3]
        counts = self._counts(scores, weights)
        grounded = norm_look(grounded, self.norm_grounded)
        parts = [self.norm(q[:, 0]), self.norm_tokens(tokens), grounded, counts]
        extreme_logits = None
        if self.extremes is not None:
            extreme, extreme_logits = self.extremes(anchors, geometry, visual, question, text_mask)
            parts.append(extreme)
        answer = self.classifier(torch.cat(parts, dim=-1))
        if with_extremes:
            if extreme_logits is None:
                raise RuntimeError("this VQA head has no extremes (ModelConfig.vqa_extremes) to train")
            return answer, extreme_logits
        return answer

    def _token_weights(self, fused_text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """A learned softmax over the question's real tokens: which ones name the subject."""
        return self.token_weight(fused_text)[..., 0].masked_fill(text_mask == 0, -1e4).softmax(-1)

    def _counts(self, scores: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Object-count features from the local maxima of each token's score map, token-
        weighted: per level, their score mass (log1p; per level and summed), and with
        count thresholds, per threshold the soft number of peaks above it (per level,
        summed over levels, and the most of any level: an object can peak on two levels)."""
        b, _, t = scores.shape
        tau = None if self.count_thresholds is None else self.count_thresholds.sigmoid()  # [K]
        mass, above, start = [], [], 0
        for h, wd in self.level_hw:
            s = scores[:, start:start + h * wd].transpose(1, 2).reshape(b * t, 1, h, wd)
            start += h * wd
            is_peak = (s == nn.functional.max_pool2d(s, 3, 1, 1)).to(s.dtype).flatten(1)  # [B*T, HW]
            s = s.flatten(1)
            mass.append(((is_peak * s).reshape(b, t, -1).sum(-1) * w).sum(-1))
            if tau is not None:
                # Steep: the background's many peaks at about 0.03 must not add up to an object.
                soft = torch.sigmoid(COUNT_SHARPNESS * (s[:, None] - tau[None, :, None])) * is_peak[:, None]
                above.append((soft.sum(-1).reshape(b, t, -1) * w[..., None]).sum(1))  # [B, K]
        counts = torch.stack(mass, dim=-1)  # [B, levels]
        out = [torch.log1p(torch.cat([counts, counts.sum(-1, keepdim=True)], dim=-1))]
        if above:
            c = torch.stack(above, dim=-1)  # [B, K, levels]
            out.append(torch.cat([c, c.sum(-1, keepdim=True), c.amax(-1, keepdim=True)], dim=-1).flatten(1))
        return torch.cat(out, dim=-1)


class Extremes(nn.Module):
    """The appearance of the extreme objects (leftmost, rightmost, topmost, bottommost,
    largest, smallest), one of them chosen by the question.

    Each extreme pools the anchors' appearance and their embeddings (whose region part
    carries the detector's reading of the shape, which "what shape is left of ..." asks for:
    relation questions reached 0.725 on the val split with the appearance alone, 0.783 with
    the embeddings too, equal steps), by softmax(objectness_scale *
    logsigmoid(objectness) + sigmoid(objectness) * coordinate_scale[k] * coordinate_k):
    background anchors (log-odds far below zero) drop out, and among the objects' anchors the
    furthest one in that direction wins. The gate is a softmax over the six read from the
    question's mean token. Trained by the answers alone, after 703 stage-2 steps it picked
    largest / smallest (0.95 / 0.53 of its weight) but not the four directions (the leftmost
    got about 0.3 whatever the word; a gate of per-token votes measured the same): it gets
    no gradient until the classifier reads the pooled extreme, which it cannot learn before
    the gate picks it. So training also supervises the gate (loss "extreme_gate") where the
    data knows which extreme answers the question.
    """

    def __init__(self, d: int, channels: int) -> None:
        super().__init__()
        self.objectness = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        nn.init.constant_(self.objectness[-1].bias, -4.0)  # objects are rare among anchors
        self.objectness_scale = nn.Parameter(torch.tensor(8.0))
        # One temperature per extreme: objects' sizes (sqrt of the area share) differ by a few
        # hundredths where their positions differ by tenths.
        self.coordinate_scale = nn.Parameter(torch.tensor([20.0, 20.0, 20.0, 20.0, 80.0, 80.0]))
        self.gate = nn.Linear(d, 6)
        self.norm = nn.LayerNorm(channels)

    def forward(self, anchors: torch.Tensor, geometry: torch.Tensor, visual: torch.Tensor,
                question: torch.Tensor, question_mask: torch.Tensor) -> tuple[torch.Tensor, ExtremeLogits]:
        """anchors [B, A, d], geometry [B, A, 5] (cx, cy, w, h, sqrt area; 0..1), visual
        [B, A, C + 3], question tokens [B, T, d] and mask [B, T] -> (chosen appearance and
        anchor embedding [B, C + 3 + d], objectness [B, A] and gate [B, 6] logits)."""
        objectness = self.objectness(anchors)[..., 0]
        coordinates = extreme_coordinates(geometry)  # [B, 6, A]
        # The coordinate term is weighted by the objectness probability too: background
        # anchors predict boxes of any size anywhere, and an additive term alone let a huge
        # background box outscore every object's "largest".
        logits = (self.objectness_scale * nn.functional.logsigmoid(objectness))[:, None] \
            + objectness.sigmoid()[:, None] * self.coordinate_scale[:, None] * coordinates
        pooled = torch.matmul(logits.softmax(-1), torch.cat([visual, anchors], dim=-1))  # [B, 6, C + 3 + d]
        mean = (question * question_mask[..., None]).sum(1) / question_mask.sum(1, keepdim=True).clamp(min=1)
        gate = self.gate(mean)  # [B, 6]
        chosen = (gate.softmax(-1)[..., None] * pooled).sum(1)
        look = norm_look(chosen[..., :visual.shape[-1]], self.norm)
        return torch.cat([look, chosen[..., visual.shape[-1]:]], dim=-1), ExtremeLogits(objectness, gate)
