"""Model outputs -> per-phrase detections in original-image pixels (numpy only).

The detector graph already picked the top-K anchors per image (boxes decoded, in
model-input pixels) with their region-token logits [K, T] and centerness [K]. Here,
as in GLIP's ATSS post-processor: token probabilities -> phrase scores through the
positive map, threshold, top-k, per-phrase NMS, cap, and map boxes back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from glipv2.boxes import Letterbox, batched_nms
from glipv2.config import PHRASE_TOKENS, TOKEN_AGGREGATIONS, ModelConfig
from glipv2.text import normalize_positive_map

__all__ = ["PostprocessConfig", "Detections", "phrase_scores", "postprocess", "postprocess_batch",
           "SERVING_SCORE_THRESHOLD"]

# The score threshold the gateway, the CLI and the demo page use when a request names none
# (the exported manifest carries it; GET /v1/models shows it). GLIP's 0.05 (the
# PostprocessConfig default) is for AP evaluation, which needs every low-score box; a user
# wants the boxes that are right. Chosen as the best F1 on the 500-image val split for the
# demo model, its phrases scored by the geometric mean (`training.evaluate` prints the sweep;
# shape + colour-qualified prompts, IoU 0.5):
#   threshold  0.05   0.30   0.40   0.45   0.50   0.60
#   precision  0.034  0.515  0.809  0.905  0.959  0.991
#   recall     1.000  0.998  0.990  0.969  0.891  0.540
#   F1         0.066  0.680  0.890  0.936  0.924  0.699
SERVING_SCORE_THRESHOLD = 0.45


@dataclass(frozen=True)
class PostprocessConfig:
    """Defaults are GLIP's test settings (pre-NMS threshold 0.05, top 1000, NMS 0.6,
    100 detections per image).

    threshold_on: "score" thresholds the final score sqrt(p * sigmoid(centerness));
    "probability" is the official ATSSPostProcessor's rule: the phrase probability p (the
    mean token sigmoid, before the centerness factor) must exceed the threshold. Models
    converted from official GLIP weights use "probability" (their manifest says so).

    token_aggregation: how a phrase's probability comes from its tokens' sigmoids (see
    phrase_probabilities): "mean" is GLIP's SCORE_AGG "MEAN"; "geometric" is their
    geometric mean, a soft AND. Each model's choice is in its config (ModelConfig), and
    `for_model` reads it.

    phrase_tokens: which of a phrase's tokens it is scored by (its positive map, built when
    the prompt is tokenized: glipv2.text.tokenize). "all": every token of its spans (GLIP's
    detection prompts); "head": for a phrase that relates its object to others ("the yellow
    circle above the green star"), the tokens of the noun phrase it is about
    (glipv2.phrases.head_phrase), as MDETR's referring-expression annotations mark it; the
    rest of the phrase is still in the prompt, read by the fusion layers. Scored by all its
    tokens, such a phrase also scores the other objects it names (the green star)."""

    score_threshold: float = 0.05
    pre_nms_topk: int = 1000
    nms_iou: float = 0.6
    max_detections: int = 100
    threshold_on: str = "score"
    token_aggregation: str = "mean"
    phrase_tokens: str = "all"

    @classmethod
    def for_model(cls, model_cfg: ModelConfig, **overrides: Any) -> "PostprocessConfig":
        """The settings a model was made for (its ModelConfig's threshold_on and
        token_aggregation), with `overrides` on top."""
        return cls(**{"threshold_on": model_cfg.threshold_on, "token_aggregation": model_cfg.token_aggregation,
                      "phrase_tokens": model_cfg.phrase_tokens, **overrides})

    def __post_init__(self) -> None:
        for name in ("score_threshold", "nms_iou"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
        for name in ("pre_nms_topk", "max_detections"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.threshold_on not in ("score", "probability"):
            raise ValueError(f"threshold_on must be 'score' or 'probability', got {self.threshold_on!r}")
        if self.token_aggregation not in TOKEN_AGGREGATIONS:
            raise ValueError(f"token_aggregation must be one of {TOKEN_AGGREGATIONS}, got {self.token_aggregation!r}")
        if self.phrase_tokens not in PHRASE_TOKENS:
            raise ValueError(f"phrase_tokens must be one of {PHRASE_TOKENS}, got {self.phrase_tokens!r}")


@dataclass
class Detections:
    boxes: np.ndarray  # float32 [N, 4] xyxy, original-image pixels
    scores: np.ndarray  # float32 [N], descending
    phrase_ids: np.ndarray  # int64 [N], index into the prompt's phrases

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def empty(cls) -> "Detections":
        return cls(
            boxes=np.zeros((0, 4), np.float32),
            scores=np.zeros(0, np.float32),
            phrase_ids=np.zeros(0, np.int64),
        )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # tanh form: exact sigmoid without exp overflow warnings on large negative logits.
    x = np.asarray(x, dtype=np.float32)
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


def _fit_tokens(pm: np.ndarray, num_tokens: int) -> np.ndarray:
    """Zero-pad a positive map's token axis up to the logits' padded length. Padding is
    at the end of the sequence, so an unpadded [P, T_i] map lines up with padded logits."""
    pm = np.asarray(pm, dtype=np.float32)
    t = pm.shape[-1]
    if t == num_tokens:
        return pm
    if t > num_tokens:
        raise ValueError(f"positive map has {t} tokens but the logits only {num_tokens}")
    pad = [(0, 0)] * (pm.ndim - 1) + [(0, num_tokens - t)]
    return np.pad(pm, pad)


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return (np.minimum(x, 0.0) - np.log1p(np.exp(-np.abs(x)))).astype(np.float32)


def phrase_probabilities(logits: np.ndarray, positive_map: np.ndarray, aggregation: str = "mean") -> np.ndarray:
    """[K, P]: each phrase's probability from its tokens' sigmoid(logits), weighted by the
    row-normalised positive map (a matmul). Zero rows give 0.

    "mean" (GLIP's SCORE_AGG "MEAN") lets a few confident words carry a phrase: in "the
    yellow square left of the green hexagon" the anchor object's own words outscore the
    subject's, and the phrase's best box was the hexagon in 11 of the demo model's 13
    relation misses. "geometric" (exp of the mean log-sigmoid) needs every word to agree."""
    logits = np.asarray(logits, dtype=np.float32)
    pm = normalize_positive_map(_fit_tokens(positive_map, logits.shape[-1]))
    if aggregation == "mean":
        return _sigmoid(logits) @ pm.T
    if aggregation != "geometric":
        raise ValueError(f"token aggregation must be one of {TOKEN_AGGREGATIONS}, got {aggregation!r}")
    return (np.exp(_log_sigmoid(logits) @ pm.T) * (pm.sum(-1) > 0)).astype(np.float32)


def phrase_scores(logits: np.ndarray, centerness: np.ndarray, positive_map: np.ndarray,
                  aggregation: str = "mean") -> np.ndarray:
    """[K, P] scores, GLIP's way: the phrase probability (phrase_probabilities) times
    sigmoid(centerness), then sqrt (a geometric mean, so the score stays on a
    probability-like scale)."""
    return _scores(phrase_probabilities(logits, positive_map, aggregation), centerness)


def _scores(probs: np.ndarray, centerness: np.ndarray) -> np.ndarray:
    """Phrase probabilities [K, P] and centerness logits [K] -> phrase_scores."""
    scores = probs * _sigmoid(np.asarray(centerness).reshape(-1))[:, None]
    return np.sqrt(np.clip(scores, 0.0, None)).astype(np.float32)


def postprocess(
    boxes: np.ndarray,
    logits: np.ndarray,
    centerness: np.ndarray,
    positive_map: np.ndarray,
    letterbox: Letterbox,
    cfg: PostprocessConfig = PostprocessConfig(),
    levels: np.ndarray | None = None,
) -> Detections:
    """Detections for one image. boxes [K, 4] are in model-input pixels.

    The threshold applies to the final (sqrt) score, or with threshold_on="probability"
    to the phrase probability as official GLIP does (see PostprocessConfig). levels [K],
    when given (every anchor of the image, not a top-K), makes the pre-NMS top-k apply per
    FPN level as in the official ATSSPostProcessor.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    probs = phrase_probabilities(logits, positive_map, cfg.token_aggregation)  # [K, P]
    if probs.shape[0] != boxes.shape[0]:
        raise ValueError(f"{boxes.shape[0]} boxes but {probs.shape[0]} rows of logits")
    scores = _scores(probs, centerness)

    passing = (probs if cfg.threshold_on == "probability" else scores) > cfg.score_threshold
    anchor_idx, phrase_idx = np.nonzero(passing)
    cand = scores[anchor_idx, phrase_idx].astype(np.float32)
    groups = [np.arange(cand.size)] if levels is None else [
        np.nonzero(np.asarray(levels)[anchor_idx] == lv)[0] for lv in np.unique(levels)]
    kept = [g[np.argsort(-cand[g], kind="stable")[: cfg.pre_nms_topk]] if g.size > cfg.pre_nms_topk else g
            for g in groups]
    sel = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    anchor_idx, phrase_idx, cand = anchor_idx[sel], phrase_idx[sel], cand[sel]
    if cand.size == 0:
        return Detections.empty()

    # Map first: IoU is invariant to the uniform letterbox scale, and clipping to the
    # original image here is GLIP's clip-to-image before NMS.
    cand_boxes = letterbox.to_original(boxes[anchor_idx])
    # Boxes entirely in the padding collapse to zero area after clipping: not objects.
    valid = (cand_boxes[:, 2] > cand_boxes[:, 0]) & (cand_boxes[:, 3] > cand_boxes[:, 1])
    cand_boxes, cand, phrase_idx = cand_boxes[valid], cand[valid], phrase_idx[valid]

    keep = batched_nms(cand_boxes, cand, phrase_idx, cfg.nms_iou)[: cfg.max_detections]
    return Detections(
        boxes=cand_boxes[keep].astype(np.float32),
        scores=cand[keep].astype(np.float32),
        phrase_ids=phrase_idx[keep].astype(np.int64),
    )


def postprocess_batch(
    boxes: np.ndarray,
    logits: np.ndarray,
    centerness: np.ndarray,
    positive_maps: np.ndarray | Sequence[np.ndarray],
    letterboxes: Sequence[Letterbox],
    cfg: PostprocessConfig = PostprocessConfig(),
) -> list[Detections]:
    """postprocess for each image of a batch. positive_maps is the padded [B, Pmax, Tp]
    (padding phrases have zero rows and produce nothing) or a list of per-image [P_i, T_i]
    maps (T_i <= the logits' T; missing trailing columns count as padding tokens)."""
    b = len(letterboxes)
    if not (len(boxes) == len(logits) == len(centerness) == len(positive_maps) == b):
        raise ValueError(
            f"batch sizes differ: boxes {len(boxes)}, logits {len(logits)}, centerness "
            f"{len(centerness)}, positive maps {len(positive_maps)}, letterboxes {b}"
        )
    return [
        postprocess(boxes[i], logits[i], centerness[i], positive_maps[i], letterboxes[i], cfg)
        for i in range(b)
    ]
