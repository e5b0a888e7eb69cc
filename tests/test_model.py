"""The GLIPv2 module: shapes, mixed prompts in one batch, batched == single, top-K."""

import pytest
import torch

from glipv2.config import ModelConfig, get_preset
from glipv2.modeling import box_ops
from glipv2.modeling.glipv2 import GLIPv2, build_model
from glipv2.text import build_prompt, pad_batch, tokenize


def _inputs(tokenizer, prompts, hw, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (len(prompts), 3, *hw), generator=g, dtype=torch.uint8)
    tb = pad_batch([tokenize(tokenizer, build_prompt(p)) for p in prompts], buckets=None)
    return images, torch.from_numpy(tb.input_ids), torch.from_numpy(tb.attention_mask)


def test_output_shapes(small_model, small_cfg, tokenizer):
    images, ids, mask = _inputs(tokenizer, ["red circle. star.", "a cross"], small_cfg.image_hw)
    out = small_model.eval()(images, ids, mask)
    a = sum((128 // s) ** 2 for s in small_cfg.strides)
    assert out.boxes.shape == (2, a, 4)
    assert out.logits.shape == (2, a, ids.shape[1])
    assert out.centerness.shape == (2, a)
    assert torch.isfinite(out.logits).all()


def test_batched_equals_single_with_different_prompts(small_model, small_cfg, tokenizer):
    """Different prompts of different lengths share one batch; padding changes nothing."""
    prompts = ["red circle. blue star. large hexagon.", "cross"]
    images, ids, mask = _inputs(tokenizer, prompts, small_cfg.image_hw)
    model = small_model.eval()
    with torch.no_grad():
        batched = model(images, ids, mask)
        for i in range(2):
            n = int(mask[i].sum())
            single = model(images[i : i + 1], ids[i : i + 1, :n], mask[i : i + 1, :n])
            torch.testing.assert_close(batched.boxes[i], single.boxes[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(batched.logits[i, :, :n], single.logits[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(batched.centerness[i], single.centerness[0], atol=1e-4, rtol=1e-4)


def test_text_features_can_be_precomputed(small_model, small_cfg, tokenizer):
    images, ids, mask = _inputs(tokenizer, ["green square."], small_cfg.image_hw)
    model = small_model.eval()
    with torch.no_grad():
        direct = model(images, ids, mask)
        cached = model(images, ids, mask, model.encode_text(ids, mask))
    torch.testing.assert_close(direct.logits, cached.logits)


def test_top_k_keeps_best_anchors(small_model, small_cfg, tokenizer):
    images, ids, mask = _inputs(tokenizer, ["circle. star.", "square"], small_cfg.image_hw)
    with torch.no_grad():
        out = small_model.eval()(images, ids, mask)
        boxes, logits, ctr = small_model.top_k(out, mask, 20)
    assert boxes.shape == (2, 20, 4) and logits.shape[:2] == (2, 20) and ctr.shape == (2, 20)
    score = logits.masked_fill(mask[:, None] == 0, -1e4).amax(-1).sigmoid() * ctr.sigmoid()
    full = out.logits.masked_fill(mask[:, None] == 0, -1e4).amax(-1).sigmoid() * out.centerness.sigmoid()
    torch.testing.assert_close(score.max(1).values, full.max(1).values)
    assert (score[:, -1:] >= full.sort(1, descending=True).values[:, 20:21] - 1e-6).all()


def test_wrong_image_size_is_rejected(small_model, tokenizer):
    images, ids, mask = _inputs(tokenizer, ["circle"], (96, 96))
    with pytest.raises(Exception, match="letterboxed"):
        small_model(images, ids, mask)


def test_box_coder_round_trip():
    g = torch.Generator().manual_seed(0)
    anchors = torch.tensor([[0.0, 0, 32, 32], [16, 16, 48, 48], [100, 40, 164, 104]])
    boxes = anchors + torch.rand(3, 4, generator=g) * 10 - 5
    torch.testing.assert_close(box_ops.decode(anchors, box_ops.encode(anchors, boxes)), boxes, atol=1e-4, rtol=1e-4)


def test_giou_hand_values():
    a = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]])
    b = torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10]])
    # identical boxes: GIoU 1 -> loss 0; disjoint 10x10 boxes 10 apart: IoU 0, hull 300,
    # union 200 -> GIoU = -100/300 -> loss 4/3.
    torch.testing.assert_close(box_ops.giou_loss(a, b), torch.tensor([0.0, 4 / 3]))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="image_hw"):
        get_preset("tiny").replace(image_hw=(100, 128))
    with pytest.raises(ValueError, match="backbone"):
        get_preset("tiny").replace(backbone="resnet50")
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("glip-xl")
    with pytest.raises(ValueError, match="unknown fields"):
        ModelConfig.from_dict({**get_preset("tiny").to_dict(), "colour": 1})


def test_config_round_trips_through_dict():
    cfg = get_preset("glip-t")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_glip_t_preset_builds_and_runs(tokenizer):
    """The official GLIP-T shapes (Swin-T, bert-base, 6 x fusion + BERT layer + DyConv,
    P3-P7), run once at a reduced input size to keep the test fast (parity with the
    official code: tests/test_official.py)."""
    cfg = get_preset("glip-t").replace(image_hw=(128, 128))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert 231e6 < n_params < 233e6  # GLIP-T: 231.78M, plus the training-only MLM head
    keys = model.state_dict().keys()
    assert "backbone.layers.2.blocks.5.attn.relative_position_bias_table" in keys
    assert "fpn.top_blocks.p7.weight" in keys
    assert "language.model.encoder.layer.11.output.dense.weight" in keys
    images, ids, mask = _inputs(tokenizer, ["person. bicycle. red car."], cfg.image_hw)
    with torch.no_grad():
        out = model(images, ids, mask)
    assert out.logits.shape[1] == sum((-(-128 // s)) ** 2 for s in cfg.strides)
    assert torch.isfinite(out.logits).all()


def test_region_embedding_reads_box_centres_in_minus_one_to_one(small_model, small_cfg):
    """The region embedding's geometry input: centres in -1..1 (the demo model was trained
    so), widths, heights and sqrt area as fractions of the input."""
    head = small_model.head
    seen = []
    hook = head.region_geometry.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    try:
        h, w = small_cfg.image_hw
        boxes = torch.tensor([[[0.0, 0.0, w / 2, h / 4], [w / 4, h / 2, w, h]]])
        head.region_extras(torch.zeros(1, 2, 3), boxes)
    finally:
        hook.remove()
    torch.testing.assert_close(seen[0], torch.tensor([[[-0.5, -0.75, 0.5, 0.25, 0.5 ** 1.5],
                                                       [0.25, 0.5, 0.75, 0.5, 0.375 ** 0.5]]]))
