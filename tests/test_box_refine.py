"""The box refiner (glipv2.modeling.box_refine): where it looks, that it starts as a no-op,
that it learns to put a box's sides on an object's edges, and its training loss."""

import numpy as np
import pytest
import torch

from glipv2.checkpoint import init_weights
from glipv2.config import LossConfig
from glipv2.modeling.box_refine import BoxRefiner
from glipv2.modeling.glipv2 import build_model
from training.batch import Collator
from training.data import GroundingSample, join_phrases
from training.losses import GLIPv2Loss
from training.train import REFINER_LR_SCALE, _anchors_per_level, param_groups
from tests.test_checkpoint import _write
from tests.test_model import _inputs


def test_strips_cross_each_side_outward():
    ref = BoxRefiner(along=3, across=3)
    pts = ref.strip_points(torch.tensor([[[10.0, 20.0, 30.0, 60.0]]]))[0, 0]  # [4, along, across, 2]
    left, top, right, bottom = pts
    torch.testing.assert_close(left[..., 0], torch.tensor([[11.0, 10.0, 9.0]] * 3))  # x: inside to outside
    torch.testing.assert_close(left[:, 0, 1], torch.tensor([20.0, 40.0, 60.0]))  # y: the side's ends included
    torch.testing.assert_close(right[..., 0], torch.tensor([[29.0, 30.0, 31.0]] * 3))
    torch.testing.assert_close(top[..., 1], torch.tensor([[21.0, 20.0, 19.0]] * 3))
    torch.testing.assert_close(top[:, 0, 0], torch.tensor([10.0, 20.0, 30.0]))
    torch.testing.assert_close(bottom[..., 1], torch.tensor([[59.0, 60.0, 61.0]] * 3))


def test_strips_read_the_map_where_their_points_are():
    """An edge map whose channels are each cell's centre x and y, in input pixels: read
    bilinearly, every strip point returns its own coordinates."""
    ref = BoxRefiner()
    hw = (64, 96)
    ys, xs = torch.meshgrid(torch.arange(32) * 2.0 + 1, torch.arange(48) * 2.0 + 1, indexing="ij")
    ramp = torch.stack([xs, ys])[None]  # [1, 2, 32, 48]: the stride-2 map of a 64 x 96 input
    boxes = torch.tensor([[[10.0, 20.0, 30.5, 40.25], [50.0, 8.0, 80.0, 50.0]]])
    got = ref.sample_strips(ramp, boxes, hw)  # [1, N, 4, 2, along * across]
    want = ref.strip_points(boxes).flatten(3, 4).transpose(-1, -2)  # [1, N, 4, 2, along * across]
    torch.testing.assert_close(got, want)


def test_a_fresh_refiner_keeps_the_boxes():
    ref = BoxRefiner()
    boxes = torch.tensor([[[3.0, 4.0, 40.0, 50.0], [60.0, 10.0, 90.0, 33.5]]])
    edges = ref.edge_maps(torch.randn(1, 3, 128, 128))
    torch.testing.assert_close(ref(edges, boxes, (128, 128)), boxes)


def test_init_from_weights_without_a_refiner_boxes_as_before(tmp_path, small_cfg, tokenizer):
    """--init-from a checkpoint trained without it (the demo's first stage): the refiner
    starts fresh and the kept boxes are that checkpoint's."""
    torch.manual_seed(0)
    plain = build_model(small_cfg).eval()
    path = tmp_path / "stage1.pt"
    _write(path, plain, small_cfg)
    cfg = small_cfg.replace(box_refinement=True)
    torch.manual_seed(1)
    refined = build_model(cfg)
    init_weights(refined, cfg, path)
    refined.eval()
    images, ids, mask = _inputs(tokenizer, ["circle. star."], small_cfg.image_hw)
    with torch.no_grad():
        want = plain.top_k(plain(images, ids, mask), mask, 30)
        got = refined.top_k(refined(images, ids, mask), mask, 30)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_top_k_returns_the_refined_boxes(small_cfg, tokenizer):
    """The kept boxes, which the exported graph returns, are the refiner's; a positive
    output moves its side outward."""
    torch.manual_seed(0)
    model = build_model(small_cfg.replace(box_refinement=True)).eval()
    images, ids, mask = _inputs(tokenizer, ["circle. star."], small_cfg.image_hw)
    with torch.no_grad():
        out = model(images, ids, mask)
        before = model.top_k(out, mask, 30)[0]
        model.box_refiner.b2.fill_(1.0)
        after = model.top_k(out, mask, 30)[0]
    torch.testing.assert_close(after, before + torch.tensor([-1.0, -1.0, 1.0, 1.0]))


def test_the_refiner_learns_at_its_own_rate(small_cfg):
    model = build_model(small_cfg.replace(box_refinement=True))
    lr_of = {id(p): g["lr"] for g in param_groups(model, 0.05, 1e-3) for p in g["params"]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(lr_of) == len(trainable)  # each parameter in one group
    assert REFINER_LR_SCALE > 1
    for name, p in trainable.items():
        assert lr_of[id(p)] == pytest.approx(1e-3 * (REFINER_LR_SCALE if name.startswith("box_refiner.") else 1))


def test_a_model_without_a_refiner_keeps_its_two_groups(small_model):
    """Decayed weights, then the rest: the groups' order before the refiner existed, which
    the optimizer state of earlier checkpoints is saved in."""
    groups = param_groups(small_model, 0.05, 1e-3)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert all(p.ndim > 1 for p in groups[0]["params"]) and all(p.ndim <= 1 for p in groups[1]["params"])


def _shapes(n: int, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n images of one filled rectangle or ellipse each on a noisy grey background, and their
    exact boxes (sub-pixel: drawn by coverage, so an edge half into a pixel shades it half)."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    images, boxes = [], []
    for _ in range(n):
        w, h = rng.uniform(10, 30, 2)
        x0, y0 = rng.uniform(4, size - 4 - w), rng.uniform(4, size - 4 - h)
        sub = (np.arange(4) + 0.5) / 4 - 0.5  # 4 x 4 supersampling for the coverage
        px = xx[..., None, None] + sub[:, None]
        py = yy[..., None, None] + sub[None, :]
        if rng.random() < 0.5:
            inside = (px >= x0) & (px <= x0 + w) & (py >= y0) & (py <= y0 + h)
        else:
            inside = ((px - x0 - w / 2) / (w / 2)) ** 2 + ((py - y0 - h / 2) / (h / 2)) ** 2 <= 1
        cover = inside.mean((-1, -2))
        colour = rng.uniform(-2, 2, 3)
        img = rng.normal(0, 0.2, (3, size, size)) + cover[None] * colour[:, None, None]
        images.append(img)
        boxes.append([x0, y0, x0 + w, y0 + h])
    return torch.tensor(np.stack(images), dtype=torch.float32), torch.tensor(boxes, dtype=torch.float32)[:, None]


def test_the_refiner_learns_to_put_sides_on_edges():
    """Boxes up to 2 px off at random: after a short training on other shapes the refined
    sides are far closer."""
    torch.manual_seed(0)
    size = 64
    pool_images, pool_boxes = _shapes(256, size, np.random.default_rng(0))
    ref = BoxRefiner()
    opt = torch.optim.Adam(ref.parameters(), lr=3e-3)
    steps = 250

    def jitter(boxes: torch.Tensor) -> torch.Tensor:
        return boxes + torch.empty_like(boxes).uniform_(-2, 2)

    for _ in range(steps):
        pick = torch.randint(0, len(pool_images), (16,))
        images, boxes = pool_images[pick], pool_boxes[pick]
        refined = ref(ref.edge_maps(images), jitter(boxes), (size, size))
        loss = (refined - boxes).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    images, boxes = _shapes(64, size, np.random.default_rng(1))
    start = jitter(boxes)
    with torch.no_grad():
        refined = ref(ref.edge_maps(images), start, (size, size))
    before = (start - boxes).abs().mean().item()
    after = (refined - boxes).abs().mean().item()
    assert before > 0.9 and after < 0.5 * before, (before, after)


def test_the_loss_trains_the_refiner_and_only_it(small_cfg, tokenizer):
    cfg = small_cfg.replace(box_refinement=True)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    caption, spans = join_phrases(["red circle", "blue star"])
    image = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    sample = GroundingSample(image, caption, spans, np.array([[10, 10, 50, 50], [60, 60, 110, 120]], np.float32),
                             np.array([0, 1]), image_id=0)
    batch = Collator(tokenizer, cfg.image_hw)([sample], step_seed=0)
    out = model(batch.images, batch.input_ids, batch.attention_mask)
    only = {k: 0.0 for k in ("grounding", "box_giou", "centerness", "contrastive", "mlm")}
    losses = GLIPv2Loss(LossConfig(**only, box_refine=1.0), _anchors_per_level(cfg))(model, out, batch)
    value = losses["box_refine"]
    assert torch.isfinite(value) and value.item() > 0
    value.backward()
    params = dict(model.named_parameters())
    assert params["box_refiner.w2"].grad.abs().sum() > 0
    assert params["box_refiner.edges.0.weight"].grad is not None
    assert params["head.bbox_pred.weight"].grad is None  # the head's boxes come in detached
    assert params["backbone.stem.0.0.weight"].grad is None
    off = GLIPv2Loss(LossConfig(**only, box_refine=0.0), _anchors_per_level(cfg))(model, out, batch)
    assert "box_refine" not in off


def test_top_k_of_a_refining_model_needs_the_edge_maps(small_cfg, tokenizer):
    model = build_model(small_cfg.replace(box_refinement=True)).eval()
    images, ids, mask = _inputs(tokenizer, ["circle."], small_cfg.image_hw)
    with torch.no_grad():
        text = model.encode_text(ids, mask)
        out = model.detect_features(model.visual(images), text, mask, model.cell_colours(images))
        with pytest.raises(ValueError, match="edge maps"):
            model.top_k(out, mask, 10)
