"""Box geometry: conversions, IoU, anchors, NMS, letterbox mapping."""

import math

import numpy as np
import pytest

from glipv2.boxes import (
    Letterbox,
    anchor_grid,
    batched_nms,
    box_area,
    box_iou,
    letterbox_scale,
    nms,
    xywh_to_xyxy,
    xyxy_to_xywh,
)


def random_boxes(rng: np.random.Generator, n: int, size: float = 100.0) -> np.ndarray:
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(1, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def nms_reference(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    """Pair-by-pair greedy NMS, written as plainly as possible."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    suppressed = [False] * len(scores)
    keep = []
    for a, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        for j in order[a + 1 :]:
            if box_iou(boxes[i : i + 1], boxes[j : j + 1])[0, 0] > thr:
                suppressed[j] = True
    return keep


# ------------------------------------------------------------------------- conversions


def test_xyxy_xywh_round_trip():
    xyxy = np.array([[10, 20, 30, 60], [0, 0, 1, 1]], dtype=np.float32)
    xywh = xyxy_to_xywh(xyxy)
    np.testing.assert_array_equal(xywh, [[10, 20, 20, 40], [0, 0, 1, 1]])
    np.testing.assert_array_equal(xywh_to_xyxy(xywh), xyxy)
    assert xywh.dtype == np.float32


def test_box_area():
    b = np.array([[0, 0, 10, 5], [3, 3, 3, 9], [5, 5, 2, 2]], dtype=np.float32)
    np.testing.assert_array_equal(box_area(b), [50, 0, 0])  # inverted box counts as empty


def test_box_iou_hand_computed():
    a = np.array([[0, 0, 10, 10], [0, 0, 2, 2]], dtype=np.float32)
    b = np.array(
        [[5, 5, 15, 15], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 5]], dtype=np.float32
    )
    iou = box_iou(a, b)
    assert iou.shape == (2, 4)
    # [0,0,10,10] vs [5,5,15,15]: inter 25, union 100 + 100 - 25 = 175.
    np.testing.assert_allclose(iou[0], [25 / 175, 1.0, 0.0, 0.5], rtol=1e-6)
    # [0,0,2,2] (area 4) lies inside the others: IoU = 4 / their area.
    np.testing.assert_allclose(iou[1], [0.0, 4 / 100, 0.0, 4 / 50], rtol=1e-6)


def test_box_iou_empty_and_degenerate():
    assert box_iou(np.zeros((0, 4)), np.zeros((3, 4))).shape == (0, 3)
    z = np.array([[1, 1, 1, 1]], dtype=np.float32)
    assert box_iou(z, z)[0, 0] == 0.0  # no NaN for zero-area pairs


# ----------------------------------------------------------------------------- anchors


def test_anchor_grid_sizes_and_values():
    anchors, levels = anchor_grid((100, 150), strides=(8, 16, 32), anchor_scale=8)
    sizes = [math.ceil(100 / s) * math.ceil(150 / s) for s in (8, 16, 32)]  # 13x19, 7x10, 4x5
    assert anchors.shape == (sum(sizes), 4) and anchors.dtype == np.float32
    assert levels.tolist() == [0] * sizes[0] + [1] * sizes[1] + [2] * sizes[2]
    np.testing.assert_allclose(anchors[0], [4 - 32, 4 - 32, 4 + 32, 4 + 32])
    # Second anchor is one step right (x), not down: row-major in (y, x).
    np.testing.assert_allclose(anchors[1], [12 - 32, 4 - 32, 12 + 32, 4 + 32])
    first_l1 = anchors[sizes[0]]
    np.testing.assert_allclose(first_l1, [8 - 64, 8 - 64, 8 + 64, 8 + 64])
    side = anchors[:, 2] - anchors[:, 0]
    np.testing.assert_allclose(side, anchors[:, 3] - anchors[:, 1])
    np.testing.assert_allclose(side, 8 * np.array([8, 16, 32])[levels])


def test_anchor_order_matches_torch_style_flatten():
    """A feature map [C, H, W] whose channels hold each location's (x, y) centre,
    flattened like feature.flatten(1).transpose(0, 1) per level and concatenated,
    must give the anchors' centres in order."""
    hw, strides = (37, 50), (8, 16, 32, 64, 128)
    anchors, _ = anchor_grid(hw, strides, anchor_scale=8)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    flat = []
    for s in strides:
        h, w = math.ceil(hw[0] / s), math.ceil(hw[1] / s)
        fmap = np.zeros((2, h, w), dtype=np.float32)  # [C=2, H, W]
        for y in range(h):
            for x in range(w):
                fmap[:, y, x] = ((x + 0.5) * s, (y + 0.5) * s)
        flat.append(fmap.reshape(2, h * w).T)  # == torch flatten(1).transpose(0, 1)
    np.testing.assert_allclose(centres, np.concatenate(flat))


# --------------------------------------------------------------------------------- NMS


def test_nms_hand_made():
    boxes = np.array(
        [
            [0, 0, 10, 10],  # 0: best
            [1, 1, 11, 11],  # 1: IoU with 0 = 81/119 = 0.68 -> suppressed at 0.6
            [20, 20, 30, 30],  # 2: separate
            [0, 0, 10, 5],  # 3: IoU with 0 = 0.5 -> kept at 0.6
        ],
        dtype=np.float32,
    )
    scores = np.array([0.9, 0.8, 0.3, 0.5], dtype=np.float32)
    keep = nms(boxes, scores, 0.6)
    assert keep.dtype == np.int64
    assert keep.tolist() == [0, 3, 2]  # descending score
    assert nms(boxes, scores, 0.4).tolist() == [0, 2]
    assert nms(boxes, scores, 0.7).tolist() == [0, 1, 3, 2]


def test_nms_keeps_box_at_iou_threshold():
    # IoU exactly equal to the threshold is kept (suppression needs IoU > threshold, as in
    # torchvision); all values are exact in binary floating point.
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 2.5]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    # IoU(0, 1) = 0.5, IoU(0, 2) = 0.25, IoU(1, 2) = 0.5
    assert nms(boxes, scores, 0.5).tolist() == [0, 1, 2]
    assert nms(boxes, scores, 0.25).tolist() == [0, 2]
    assert nms(boxes, scores, np.nextafter(0.25, 0)).tolist() == [0]
    assert nms(boxes, scores, np.nextafter(0.5, 0)).tolist() == [0, 2]
    # The same boundary through the per-phrase path (its shifted coordinates stay exact).
    groups = np.array([3, 3, 9])
    assert batched_nms(boxes, scores, groups, 0.5).tolist() == [0, 1, 2]
    assert batched_nms(boxes, scores, np.array([3, 3, 3]), np.nextafter(0.5, 0)).tolist() == [0, 2]


def test_nms_empty():
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []
    assert batched_nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), 0.5).tolist() == []


@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_nms_matches_reference(thr):
    rng = np.random.default_rng(int(thr * 10))
    boxes = random_boxes(rng, 120)
    scores = rng.uniform(0, 1, 120).astype(np.float32)
    assert nms(boxes, scores, thr).tolist() == nms_reference(boxes, scores, thr)


def test_batched_nms_keeps_other_groups():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    groups = np.array([0, 1, 0, 7])
    # Identical boxes in groups 0, 1 and 7 all survive; box 2 is suppressed by box 0.
    assert batched_nms(boxes, scores, groups, 0.5).tolist() == [0, 1, 3]
    assert nms(boxes, scores, 0.5).tolist() == [0]


def test_batched_nms_matches_per_group_reference():
    rng = np.random.default_rng(0)
    boxes = random_boxes(rng, 200, size=1000.0)
    scores = rng.uniform(0, 1, 200).astype(np.float32)
    groups = rng.integers(0, 80, 200)
    got = batched_nms(boxes, scores, groups, 0.5)
    expected = []
    for g in np.unique(groups):
        idx = np.nonzero(groups == g)[0]
        expected += idx[nms_reference(boxes[idx], scores[idx], 0.5)].tolist()
    expected.sort(key=lambda i: -scores[i])
    assert got.tolist() == expected


# --------------------------------------------------------------------------- letterbox


def test_letterbox_scale():
    assert letterbox_scale((480, 640), (800, 1333)) == pytest.approx(800 / 480)
    assert letterbox_scale((1000, 4000), (800, 1333)) == pytest.approx(1333 / 4000)
    with pytest.raises(ValueError):
        letterbox_scale((0, 10), (10, 10))


def test_letterbox_round_trip():
    lb = Letterbox.fit((480, 640), (512, 512))
    assert lb.scale == pytest.approx(0.8) and lb.resized_hw == (384, 512)
    boxes = np.array([[10, 20, 300, 400], [0, 0, 640, 480]], np.float32)
    np.testing.assert_allclose(lb.to_input(boxes), boxes * 0.8, rtol=1e-6)
    np.testing.assert_allclose(lb.to_original(lb.to_input(boxes)), boxes, rtol=1e-5)


def test_letterbox_to_original_clips():
    lb = Letterbox.fit((100, 200), (64, 64))  # scale 0.32, content 32 x 64
    out = lb.to_original(np.array([[-5, -5, 70, 60], [10, 40, 20, 60]], np.float32))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], [0, 0, 200, 100])
    # A box entirely in the bottom padding collapses to zero height on the border.
    assert out[1, 1] == out[1, 3] == 100


def test_letterbox_is_frozen():
    lb = Letterbox.fit((10, 10), (20, 20))
    with pytest.raises(AttributeError):
        lb.scale = 3.0  # type: ignore[misc]
