"""Each loss: a finite value, gradients into the parts it trains, off when weighted 0, and
the value of small hand-computed cases."""

import dataclasses

import numpy as np
import pytest
import torch

from glipv2.config import LossConfig
from glipv2.modeling.glipv2 import DetectorOutput
from glipv2.modeling.head import HeadOutput
from training.batch import Collator, phrase_key
from training.data import GroundingSample, join_phrases
from training.losses import GLIPv2Loss, sigmoid_focal_loss
from training.targets import atss_assign, merge_duplicate_phrases
from training.train import _anchors_per_level


def _sample(phrases, boxes, links, size=(128, 128), seed=0):
    caption, spans = join_phrases(phrases)
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
    return GroundingSample(image, caption, spans, np.array(boxes, np.float32).reshape(-1, 4),
                           np.array(links, np.int64), image_id=seed)


@pytest.fixture()
def batch(small_cfg, tokenizer):
    samples = [
        _sample(["red circle", "blue star"], [[10, 10, 50, 50], [60, 60, 110, 120]], [0, 1]),
        _sample(["red circle", "cross", "hexagon"], [[20, 30, 70, 90]], [0], seed=1),
        _sample(["square"], [], [], seed=2),  # a prompt that denotes nothing
    ]
    return Collator(tokenizer, small_cfg.image_hw, mlm_fraction=1.0, mlm_probability=0.5)(samples, step_seed=3)


def _losses(model, batch, cfg_kwargs, small_cfg):
    model.train()
    out = model(batch.images, batch.input_ids, batch.attention_mask)
    return GLIPv2Loss(LossConfig(**cfg_kwargs), _anchors_per_level(small_cfg))(model, out, batch)


ONLY = {name: {k: (1.0 if k == name else 0.0) for k in ("grounding", "box_giou", "centerness", "contrastive", "mlm")}
        for name in ("grounding", "box_giou", "centerness", "contrastive", "mlm")}
TRAINS = {
    "grounding": "head.dot_product_projection_text.weight",
    "box_giou": "head.bbox_pred.weight",
    "centerness": "head.centerness.weight",
    "contrastive": "head.dot_product_projection_text.weight",
    "mlm": "mlm_head.transform.0.weight",
}


@pytest.mark.parametrize("name", list(ONLY))
def test_each_loss_has_gradients(name, small_model, batch, small_cfg):
    losses = _losses(small_model, batch, ONLY[name], small_cfg)
    assert set(losses) >= {name, "total"}
    value = losses[name]
    assert torch.isfinite(value) and value.item() > 0
    value.backward()
    params = dict(small_model.named_parameters())
    grad = params[TRAINS[name]].grad
    assert grad is not None and grad.abs().sum() > 0
    if name != "mlm":  # every detection loss reaches the backbone
        assert params["backbone.stem.0.0.weight"].grad.abs().sum() > 0
    assert params["language.model.embeddings.word_embeddings.weight"].grad is None  # frozen


def test_zero_weight_switches_a_loss_off(small_model, batch, small_cfg):
    losses = _losses(small_model, batch, {"contrastive": 0.0, "mlm": 0.0}, small_cfg)
    assert "contrastive" not in losses and "mlm" not in losses
    torch.testing.assert_close(losses["total"], losses["grounding"] + losses["box_giou"] + losses["centerness"])


def test_focal_loss_hand_value():
    logits = torch.tensor([0.0, 2.0])
    targets = torch.tensor([1.0, 0.0])
    p = torch.sigmoid(logits)
    expected = torch.stack([0.25 * (1 - p[0]) ** 2 * -torch.log(p[0]), 0.75 * p[1] ** 2 * -torch.log(1 - p[1])])
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, 0.25, 2.0), expected)


def test_atss_matches_anchors_inside_the_box():
    from glipv2.boxes import anchor_grid

    anchors, _ = anchor_grid((128, 128), (8, 16, 32), 4.0)
    anchors = torch.from_numpy(anchors)
    gt = torch.tensor([[16.0, 16, 48, 48], [80, 80, 120, 120]])
    matched = atss_assign(anchors, [256, 64, 16], gt)
    for g in range(2):
        pos = anchors[matched == g]
        assert len(pos) > 0
        centre = (pos[:, :2] + pos[:, 2:]) / 2
        assert ((centre > gt[g, :2]) & (centre < gt[g, 2:])).all()
    assert (matched == -1).sum() > len(anchors) * 0.8
    assert (atss_assign(anchors, [256, 64, 16], torch.zeros(0, 4)) == -1).all()


def test_duplicate_boxes_share_their_phrases():
    gt = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]])
    merged = merge_duplicate_phrases(gt, torch.tensor([0, 2, 1]), 3)
    assert merged.tolist() == [[True, False, True], [True, False, True], [False, True, False]]


def test_contrastive_targets_cross_images(batch):
    """'red circle' in image 1's prompt has the key of 'red circle' in image 0's prompt."""
    assert batch.phrase_keys[0, 0] == batch.phrase_keys[1, 0] == phrase_key("Red  circle")
    assert batch.phrase_keys[0, 1] != batch.phrase_keys[1, 1]
    assert batch.phrase_keys[2, 1:].eq(0).all()  # padding phrases


def test_mlm_masks_only_real_words(batch, tokenizer):
    masked = batch.mlm_labels >= 0
    assert masked.any()
    assert (batch.attention_mask[masked] == 1).all()
    assert not (batch.mlm_labels[masked] == tokenizer.cls_id).any()
    assert not (batch.mlm_labels[masked] == tokenizer.token_to_id(".")).any()


# ------------------------------------------------------------- hand-computed references


def test_giou_loss_hand_value():
    from glipv2.modeling import box_ops

    pred = torch.tensor([[0.0, 0, 2, 2], [0, 0, 4, 4], [0, 0, 1, 1]])
    target = torch.tensor([[1.0, 1, 3, 3], [0, 0, 4, 4], [2, 0, 3, 1]])
    # 1: inter 1, union 7, hull 9 -> GIoU 1/7 - 2/9; 2: identical -> 0;
    # 3: disjoint, union 2, hull 3 -> GIoU 0 - 1/3, loss 4/3
    expected = torch.tensor([1 - (1 / 7 - 2 / 9), 0.0, 4 / 3])
    torch.testing.assert_close(box_ops.giou_loss(pred, target), expected)


def test_centerness_target_hand_value():
    from glipv2.modeling import box_ops

    anchors = torch.tensor([[1.0, 0, 3, 2], [3, 1, 5, 3]])  # centres (2, 1) and (4, 2)
    boxes = torch.tensor([[0.0, 0, 8, 4], [0, 0, 8, 4]])
    # (2, 1): l 2, r 6, t 1, b 3 -> sqrt(2/6 * 1/3) = 1/3; (4, 2) is the centre -> 1
    torch.testing.assert_close(box_ops.centerness_target(anchors, boxes), torch.tensor([1 / 3, 1.0]))


def test_box_geometry_hand_values():
    """(cx, cy, w, h, sqrt area) as fractions of a 200-high, 100-wide image; a box over the
    edge is clamped to the image first."""
    from glipv2.modeling import box_ops

    boxes = torch.tensor([[10.0, 20, 50, 100], [-20, 150, 100, 260]])
    expected = torch.tensor([[0.3, 0.3, 0.4, 0.4, 0.4], [0.5, 0.875, 1.0, 0.25, 0.5]])
    torch.testing.assert_close(box_ops.box_geometry(boxes, (200, 100)), expected)


def _focal(x: float, target: int) -> float:
    """GLIP's focal loss (alpha 0.25, gamma 2) of one logit, written out."""
    p = 1 / (1 + np.exp(-x))
    return -0.25 * (1 - p) ** 2 * np.log(p) if target else -0.75 * p**2 * np.log(1 - p)


def test_contrastive_loss_hand_value(small_model, batch):
    """Two prompts, "circle. star." and "circle. square." (its last token padding), one
    positive region each: a "circle" region and a "square" region. With zero region and
    token embeddings every logit is the token's bias, so the loss is a sum of focal terms
    over a target table written out by hand: a region's positives are the tokens of
    phrases with its phrase's text, in either prompt."""
    circle, star, square = 11, 22, 33  # phrase keys (text hashes)
    b = dataclasses.replace(
        batch,
        positive_map=torch.tensor([[[0, 1, 0, 0], [0, 0, 1, 0]], [[0, 1, 0, 0], [0, 0, 1, 0]]], dtype=torch.float32),
        phrase_keys=torch.tensor([[circle, star], [circle, square]]),
        attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        step_seed=0,
    )
    bias = torch.tensor([[0.0, 1.0, -1.0, 2.0], [0.5, -2.0, 3.0, 5.0]])
    head = HeadOutput(box_deltas=torch.zeros(2, 3, 4), centerness=torch.zeros(2, 3),
                      regions=torch.zeros(2, 3, 8), tokens=torch.zeros(2, 4, 8), token_bias=bias,
                      fused_text=torch.zeros(2, 4, 8))
    out = DetectorOutput(boxes=torch.zeros(2, 3, 4), logits=torch.zeros(2, 3, 4), centerness=torch.zeros(2, 3), head=head)
    pos_index = [(0, torch.tensor([0]), torch.tensor([[True, False]])),  # image 0, anchor 0: "circle"
                 (1, torch.tensor([2]), torch.tensor([[False, True]]))]  # image 1, anchor 2: "square"
    loss = GLIPv2Loss(LossConfig(), [])._contrastive(small_model, out, b, pos_index)

    #         image 0 tokens | image 1 tokens (the last is padding)
    target = [[0, 1, 0, 0,     0, 1, 0, None],   # the circle region
              [0, 0, 0, 0,     0, 0, 1, None]]   # the square region
    logits = bias.flatten().tolist()
    expected = sum(_focal(x, t) for row in target for x, t in zip(logits, row) if t is not None) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
