"""The shapes world follows docs/shapes-world.md: scene constraints, tight boxes on the
rendered pixels, and task ground truth checked against an independent reading."""

from __future__ import annotations

import re

import numpy as np
import pytest

from training import shapes_world as sw
from training.augment import augment

N_SCENES = 150


def scenes(n: int = N_SCENES, seed: int = 7):
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        yield sw.sample_scene(rng), rng


def test_vocabulary_matches_spec():
    assert sw.SHAPES == ("circle", "square", "triangle", "star", "hexagon", "cross")
    assert sw.COLOURS == {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
                          "yellow": (235, 210, 40), "purple": (140, 60, 180),
                          "orange": (245, 140, 30)}


def test_scene_constraints():
    counts = set()
    for scene, _ in scenes():
        assert 256 <= scene.width <= 640 and 256 <= scene.height <= 640
        assert 1 <= len(scene.objects) <= 6
        counts.add(len(scene.objects))
        short = min(scene.width, scene.height)
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= scene.width and 0 <= y0 < y1 <= scene.height
            for side in (x1 - x0, y1 - y0):
                assert 0.08 * short - 1e-6 <= side <= 0.40 * short + 1e-6
            assert o.shape in sw.SHAPES and o.colour in sw.COLOURS
            assert all(abs(c - r) <= 25 for c, r in zip(o.rgb, sw.COLOURS[o.colour]))
            if o.shape == "circle":
                assert o.angle == 0
            # the box is the tight box of the polygon that gets drawn
            poly = sw.shape_polygon(o)
            np.testing.assert_allclose([*poly.min(0), *poly.max(0)], o.box, atol=1e-6)
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1:]:
                assert sw.box_iou(a.box, b.box) <= 0.3 + 1e-9
        for colour in (scene.background.colour, scene.background.colour2):
            if colour is not None:  # never within an object colour's jitter range
                assert all(max(abs(a - b) for a, b in zip(colour, c)) > 25
                           for c in sw.COLOURS.values())
    assert counts >= {1, 2, 3, 4, 5, 6}


def test_render_is_deterministic_and_uint8():
    scene, _ = next(scenes(1))
    a = sw.render(scene, np.random.default_rng(3))
    b = sw.render(scene, np.random.default_rng(3))
    assert a.dtype == np.uint8 and a.shape == (scene.height, scene.width, 3)
    np.testing.assert_array_equal(a, b)


def _pixel_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)


@pytest.mark.parametrize("antialias", [1, 2, 4])
@pytest.mark.parametrize("edges", [False, True])
def test_boxes_tight_on_rendered_pixels(antialias, edges):
    # every object alone on a flat background: the pixels it touches span exactly the
    # integer hull of its float box, i.e. the box is tight to under one pixel
    for scene, _ in scenes(12, seed=11):
        for o in scene.objects:
            alone = sw.Scene(scene.width, scene.height, [o], sw.Background("flat", (128, 128, 128)))
            img = sw.render(alone, np.random.default_rng(0), antialias=antialias, edges=edges)
            got = _pixel_box(np.abs(img.astype(int) - 128).max(2) > 0)
            b = np.array(o.box)
            np.testing.assert_array_equal(got, [*np.floor(b[:2]), *np.ceil(b[2:])])


def test_boxes_tight_in_full_scenes():
    # the real renderer path (textured backgrounds, random antialiasing and edges):
    # diff against the same background without objects, for objects nobody overlaps
    checked = 0
    for scene, _ in scenes(40, seed=12):
        img = sw.render(scene, np.random.default_rng(5))
        empty = sw.Scene(scene.width, scene.height, [], scene.background)
        bg = sw.render(empty, np.random.default_rng(5))
        changed = np.abs(img.astype(int) - bg).max(2) > 0
        for o in scene.objects:
            grown = (o.box[0] - 2, o.box[1] - 2, o.box[2] + 2, o.box[3] + 2)
            if any(p is not o and sw.box_iou(grown, p.box) > 0 for p in scene.objects):
                continue
            x0, y0 = max(int(grown[0]), 0), max(int(grown[1]), 0)
            window = np.zeros_like(changed)
            window[y0:int(grown[3]) + 1, x0:int(grown[2]) + 1] = True
            got = _pixel_box(changed & window)
            assert np.abs(got - np.array(o.box)).max() < 1.0
            checked += 1
    assert checked > 20


def test_render_speed_and_augment_shape():
    import time
    rng = np.random.default_rng(0)
    scene = sw.sample_scene(rng)
    t = time.perf_counter()
    img = sw.render(scene, rng)
    out = augment(img, rng)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert time.perf_counter() - t < 0.5  # generous: a few ms in practice


# ----------------------------------------------------------------------- task ground truth
def _objs(scene, colour=None, shape=None):
    return [i for i, o in enumerate(scene.objects)
            if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)]


def _holds(scene, i, rel, j):
    (sx, sy), (ax, ay) = scene.objects[i].centre, scene.objects[j].centre
    return {"left of": sx < ax, "right of": sx > ax, "above": sy < ay, "below": sy > ay}[rel]


_COL = "|".join(sw.COLOURS)
_SHP = "|".join(sw.SHAPES)
_REL = "left of|right of|above|below"


def test_grounding_phrases_denote_the_right_objects():
    kinds = set()
    for scene, rng in scenes():
        phrases = sw.grounding_phrases(scene, rng)
        texts = [p.text for p in phrases]
        assert len(set(texts)) == len(texts)
        for p in phrases:
            kinds.add(p.kind)
            if m := re.fullmatch(rf"({_COL}) ({_SHP})", p.text):
                assert p.kind == "colour"
                assert p.objects == _objs(scene, *m.groups())
            elif m := re.fullmatch(rf"(small|large) (?:({_COL}) )?({_SHP})", p.text):
                word, colour, shape = m.groups()
                assert p.kind == "size"
                same = _objs(scene, shape=shape)
                assert len(same) >= 2
                pick = (max if word == "large" else min)(same, key=lambda i: scene.objects[i].area)
                assert p.objects == [pick]
                assert colour is None or scene.objects[pick].colour == colour
            elif m := re.fullmatch(rf"the ({_COL}) ({_SHP}) ({_REL}) the ({_COL}) ({_SHP})", p.text):
                c1, s1, rel, c2, s2 = m.groups()
                assert p.kind == "relation"
                anchor = _objs(scene, c2, s2)
                assert len(anchor) == 1
                want = [i for i in _objs(scene, c1, s1) if _holds(scene, i, rel, anchor[0])]
                assert p.objects == want
            else:
                pytest.fail(f"unexpected phrase {p.text!r}")
        pos = sum(bool(p.objects) or p.kind != "colour" for p in phrases)
        neg = len(phrases) - pos
        absent = 36 - len({(o.colour, o.shape) for o in scene.objects})
        assert abs(neg - pos) <= 1 or neg == absent
    assert kinds == {"colour", "size", "relation"}


def test_detection_phrases():
    saw_all = saw_partial = False
    for scene, rng in scenes():
        phrases = sw.detection_phrases(scene, rng)
        assert len(set(phrases)) == len(phrases) and set(phrases) <= set(sw.SHAPES)
        assert {o.shape for o in scene.objects} <= set(phrases)
        saw_all |= len(phrases) == 6
        saw_partial |= len(phrases) < 6
    assert saw_all and saw_partial


def test_vqa_answers():
    seen = set()
    plural = {v: k for k, v in sw.PLURALS.items()}
    for scene, rng in scenes():
        for q, a in sw.vqa_pairs(scene, rng):
            assert re.fullmatch(r"[a-z0-9]+", a), (q, a)
            if m := re.fullmatch(rf"what color is the ({_SHP})\?", q):
                (i,) = _objs(scene, shape=m[1])
                assert a == scene.objects[i].colour
                seen.add("colour")
            elif m := re.fullmatch(r"how many (\w+) are there\?", q):
                assert a == str(len(_objs(scene, shape=plural[m[1]])))
                seen.add("count")
            elif m := re.fullmatch(rf"is there an? ({_COL}) ({_SHP})\?", q):
                assert a == ("yes" if _objs(scene, *m.groups()) else "no")
                seen.add(a)
            elif m := re.fullmatch(rf"what shape is ({_REL}) the ({_COL}) ({_SHP})\?", q):
                rel, c, s = m.groups()
                (j,) = _objs(scene, c, s)
                shapes = {scene.objects[i].shape for i in range(len(scene.objects))
                          if i != j and _holds(scene, i, rel, j)}
                assert shapes == {a}
                seen.add("relation")
            elif m := re.fullmatch(r"what color is the (largest|smallest) object\?", q):
                areas = [o.area for o in scene.objects]
                k = int(np.argmax(areas) if m[1] == "largest" else np.argmin(areas))
                assert a == scene.objects[k].colour
                seen.add("size")
            else:
                pytest.fail(f"unexpected question {q!r}")
    assert seen == {"colour", "count", "yes", "no", "relation", "size"}


def test_captions_name_every_object():
    for scene, rng in scenes(60):
        caps = sw.captions(scene, rng, n=5)
        assert len(caps) == 5
        if len(scene.objects) >= 2:
            assert len(set(caps)) > 1
        for c in caps:
            for o in scene.objects:
                assert f"{o.colour} {o.shape}" in c  # "red circle" or "red circles"
            if len(scene.objects) >= 2 and re.search(_REL, c):
                assert re.search(rf"({_COL}) ({_SHP}) (to the )?({_REL}|under) (a|an|another) ", c)


def test_task_derivation_is_deterministic():
    scene, _ = next(scenes(1))
    for fn in (sw.detection_phrases, sw.grounding_phrases, sw.vqa_pairs, sw.captions):
        assert fn(scene, np.random.default_rng(9)) == fn(scene, np.random.default_rng(9))
