"""Model outputs -> per-phrase detections, on synthetic logits."""

import numpy as np
import pytest

from glipv2.boxes import Letterbox
from glipv2.postprocess import (
    Detections,
    PostprocessConfig,
    phrase_scores,
    postprocess,
    postprocess_batch,
)
from glipv2.text import Tokenizer, build_prompt, pad_batch, tokenize

LOW, HIGH = -12.0, 10.0


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


def sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


def test_config_validation():
    PostprocessConfig()  # GLIP defaults are valid
    for field, bad in [
        ("score_threshold", -0.1),
        ("score_threshold", 1.5),
        ("nms_iou", 2.0),
        ("pre_nms_topk", 0),
        ("max_detections", -3),
        ("max_detections", 2.5),
        ("token_aggregation", "max"),
        ("phrase_tokens", "root"),
    ]:
        with pytest.raises(ValueError, match=field):
            PostprocessConfig(**{field: bad})
    from glipv2.config import get_preset

    # the settings a model was made for: the demo preset scores relation phrases by their head
    assert PostprocessConfig.for_model(get_preset("tiny")).phrase_tokens == "head"
    assert PostprocessConfig.for_model(get_preset("glip-t")).phrase_tokens == "all"  # official GLIP's


def test_phrase_scores_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (5, 6)).astype(np.float32)
    centerness = rng.normal(0, 2, 5).astype(np.float32)
    pm = np.array([[0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]], np.float32)
    s = phrase_scores(logits, centerness, pm)
    assert s.shape == (5, 3) and s.dtype == np.float32
    p = sigmoid(logits)
    c = sigmoid(centerness)
    np.testing.assert_allclose(s[:, 0], np.sqrt(p[:, 1:3].mean(1) * c), rtol=1e-5)
    np.testing.assert_allclose(s[:, 1], np.sqrt(p[:, 3] * c), rtol=1e-5)
    assert (s[:, 2] == 0).all()  # padding phrase
    # A shorter (unpadded) positive map lines up with padded logits.
    np.testing.assert_allclose(phrase_scores(logits, centerness, pm[:, :4]), s, rtol=1e-6)
    assert np.isfinite(phrase_scores(np.full((1, 6), -1e4), np.array([-1e4]), pm)).all()


def test_end_to_end_on_a_real_prompt(tok):
    tp = tokenize(tok, build_prompt("red circle. hexagon."))  # hexagon -> tokens 4, 5, 6
    k, t = 4, tp.num_tokens
    logits = np.full((k, t), LOW, np.float32)
    logits[2, 4:7] = HIGH  # anchor 2 is a hexagon
    logits[0, 1:3] = HIGH  # anchor 0 is a red circle
    centerness = np.full(k, HIGH, np.float32)
    boxes = np.array(
        [[0, 0, 8, 8], [1, 1, 2, 2], [10, 10, 30, 20], [5, 5, 6, 6]], np.float32
    )  # model-input pixels
    lb = Letterbox.fit((200, 400), (100, 100))  # scale 0.25
    det = postprocess(boxes, logits, centerness, tp.positive_map, lb, PostprocessConfig())
    assert isinstance(det, Detections) and len(det) == 2
    assert det.boxes.dtype == np.float32 and det.phrase_ids.dtype == np.int64
    assert sorted(det.phrase_ids.tolist()) == [0, 1]
    by_phrase = {int(p): b for p, b in zip(det.phrase_ids, det.boxes)}
    np.testing.assert_allclose(by_phrase[1], [40, 40, 120, 80], rtol=1e-6)
    np.testing.assert_allclose(by_phrase[0], [0, 0, 32, 32], rtol=1e-6)
    assert (det.scores > 0.99).all()


def test_geometric_aggregation_needs_every_token():
    """Two anchors for a 3-token phrase: one where two words are sure and the third says no
    (the anchor object of a relation phrase), one where every word half-agrees. The mean
    prefers the first, the geometric mean the second; hand-computed values, random logits,
    extreme logits and padding phrases too."""
    p = np.array([[0.99, 0.99, 0.05], [0.6, 0.6, 0.6]])
    logits = np.log(p / (1 - p)).astype(np.float32)
    pm = np.array([[1, 1, 1], [0, 0, 0]], np.float32)
    ctr = np.zeros(2, np.float32)
    mean = phrase_scores(logits, ctr, pm) ** 2 * 2  # sqrt(prob * sigmoid(0)) -> prob
    geo = phrase_scores(logits, ctr, pm, "geometric") ** 2 * 2
    np.testing.assert_allclose(mean[:, 0], p.mean(1), rtol=1e-4)
    np.testing.assert_allclose(geo[:, 0], np.cbrt(p.prod(1)), rtol=1e-4)
    assert mean[0, 0] > mean[1, 0] and geo[0, 0] < geo[1, 0]
    assert (geo[:, 1] == 0).all()  # padding phrase
    rng = np.random.default_rng(0)
    x = rng.normal(0, 4, (5, 6)).astype(np.float32)
    pm = np.array([[0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1]], np.float32)
    s = phrase_scores(x, np.zeros(5, np.float32), pm, "geometric") ** 2 * 2
    np.testing.assert_allclose(s[:, 0], np.exp(np.log(sigmoid(x[:, 1:4])).mean(1)), rtol=1e-4)
    np.testing.assert_allclose(s[:, 1], sigmoid(x[:, 5]), rtol=1e-4)  # one token: its sigmoid
    assert np.isfinite(phrase_scores(np.full((1, 6), -1e4), np.array([-1e4]), pm, "geometric")).all()
    with pytest.raises(ValueError, match="geometric"):
        phrase_scores(x, np.zeros(5, np.float32), pm, "median")


def test_postprocess_scores_with_the_configured_aggregation():
    """The relation case end to end: with "geometric" the box all words half-agree on wins."""
    p = np.array([[0.99, 0.99, 0.05], [0.6, 0.6, 0.6]])
    logits = np.log(p / (1 - p)).astype(np.float32)
    boxes = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    lb = Letterbox.fit((100, 100), (100, 100))
    pm = np.ones((1, 3), np.float32)
    top = {agg: postprocess(boxes, logits, np.zeros(2, np.float32), pm, lb,
                            PostprocessConfig(token_aggregation=agg)).boxes[0, 0]
           for agg in ("mean", "geometric")}
    assert top == {"mean": 0.0, "geometric": 50.0}


def test_threshold_topk_and_max_detections():
    rng = np.random.default_rng(1)
    k, t = 50, 8
    # 50 well separated boxes; scores spread over (0, 1).
    xs = np.arange(k, dtype=np.float32) * 20
    boxes = np.stack([xs, np.zeros(k), xs + 10, np.full(k, 10)], 1).astype(np.float32)
    logits = rng.normal(0, 4, (k, t)).astype(np.float32)
    centerness = rng.normal(2, 1, k).astype(np.float32)
    pm = np.zeros((2, t), np.float32)
    pm[0, 1:3] = 1
    pm[1, 4] = 1
    lb = Letterbox.fit((10, 1000), (10, 1000))
    all_scores = phrase_scores(logits, centerness, pm)

    det = postprocess(boxes, logits, centerness, pm, lb, PostprocessConfig(score_threshold=0.5))
    assert len(det) == int((all_scores > 0.5).sum()) > 0
    assert (det.scores > 0.5).all()
    assert (np.diff(det.scores) <= 0).all()  # descending

    det = postprocess(boxes, logits, centerness, pm, lb, PostprocessConfig(max_detections=3))
    np.testing.assert_allclose(det.scores, np.sort(all_scores.ravel())[::-1][:3], rtol=1e-6)

    det = postprocess(boxes, logits, centerness, pm, lb, PostprocessConfig(pre_nms_topk=5))
    assert len(det) == 5

    det = postprocess(boxes, logits, centerness, pm, lb, PostprocessConfig(score_threshold=1.0))
    assert len(det) == 0 and det.boxes.shape == (0, 4)


def test_nms_is_per_phrase():
    t = 4
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [0, 1, 10, 11]], np.float32)
    logits = np.full((3, t), LOW, np.float32)
    logits[0, 1] = HIGH  # phrase 0, best
    logits[1, 1] = HIGH - 1  # phrase 0, overlaps anchor 0 -> suppressed
    logits[2, 2] = HIGH - 2  # phrase 1, overlaps anchor 0 but another phrase -> kept
    pm = np.array([[0, 1, 0, 0], [0, 0, 1, 0]], np.float32)
    lb = Letterbox.fit((20, 20), (20, 20))
    det = postprocess(boxes, logits, np.full(3, HIGH), pm, lb)
    assert det.phrase_ids.tolist() == [0, 1]
    np.testing.assert_allclose(det.boxes, boxes[[0, 2]])


def test_boxes_in_padding_are_dropped():
    boxes = np.array([[0, 60, 10, 70], [0, 0, 10, 10]], np.float32)  # first lies in padding
    logits = np.full((2, 3), HIGH, np.float32)
    pm = np.array([[0, 1, 0]], np.float32)
    lb = Letterbox.fit((50, 100), (100, 100))  # content is the top 50 rows
    det = postprocess(boxes, logits, np.full(2, HIGH), pm, lb)
    assert len(det) == 1
    np.testing.assert_allclose(det.boxes[0], [0, 0, 10, 10])


def test_batch_with_padded_prompts(tok):
    items = [tokenize(tok, build_prompt(p)) for p in ("star.", "red circle. hexagon. star.")]
    batch = pad_batch(items)  # Tp = 16, Pmax = 3
    b, k, tp = 2, 3, batch.input_ids.shape[1]
    # Every token, padding included, fires everywhere: only real phrases may come out.
    logits = np.full((b, k, tp), HIGH, np.float32)
    centerness = np.full((b, k), HIGH, np.float32)
    boxes = np.tile(np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 0, 50, 10]], np.float32), (b, 1, 1))
    lbs = [Letterbox.fit((64, 64), (64, 64)), Letterbox.fit((128, 128), (64, 64))]
    dets = postprocess_batch(boxes, logits, centerness, batch.positive_map, lbs)
    assert len(dets) == 2
    assert sorted(set(dets[0].phrase_ids.tolist())) == [0] and len(dets[0]) == 3
    assert sorted(set(dets[1].phrase_ids.tolist())) == [0, 1, 2] and len(dets[1]) == 9
    assert dets[1].boxes.max() == pytest.approx(100.0)  # scale 0.5 undone

    # The same with unpadded per-image positive maps.
    again = postprocess_batch(boxes, logits, centerness, [it.positive_map for it in items], lbs)
    for d1, d2 in zip(dets, again):
        np.testing.assert_array_equal(d1.phrase_ids, d2.phrase_ids)
        np.testing.assert_allclose(d1.boxes, d2.boxes)

    with pytest.raises(ValueError):
        postprocess_batch(boxes, logits, centerness, batch.positive_map, lbs[:1])
