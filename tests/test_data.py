"""training.data: the shapes-world dataset and the loaders of the real formats."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from training import shapes_world as sw
from training.data import (EXTRA_RELATIONS, CaptionDataset, CocoDetectionDataset, DatasetError, GroundingDataset,
                           ShapesWorldDataset, VqaDataset, join_phrases, load_image, scene_sample)


def test_join_phrases():
    caption, spans = join_phrases(["red circle", "star", "large blue cross"])
    assert caption == "red circle. star. large blue cross."
    assert [caption[a:b] for (a, b), in spans] == ["red circle", "star", "large blue cross"]
    assert join_phrases([]) == ("", [])


# ----------------------------------------------------------------------- shapes world
def _check_sample(s):
    assert s.image.dtype == np.uint8 and s.image.ndim == 3 and s.image.shape[2] == 3
    assert s.boxes.dtype == np.float32 and s.boxes.shape == (len(s.box_phrase), 4)
    assert s.box_phrase.dtype == np.int64
    assert all(0 <= j < len(s.phrase_spans) for j in s.box_phrase)
    for spans in s.phrase_spans:
        assert all(0 <= a < b <= len(s.caption) for a, b in spans)
    assert s.phrase_kinds is None or len(s.phrase_kinds) == len(s.phrase_spans)


def test_shapes_dataset_is_deterministic_per_index():
    ds = ShapesWorldDataset(seed=3, length=50)
    a, b = ds[17], ShapesWorldDataset(seed=3, length=50)[17]  # a fresh dataset = a resume
    np.testing.assert_array_equal(a.image, b.image)
    assert a.caption == b.caption and a.phrase_spans == b.phrase_spans
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.box_phrase, b.box_phrase)
    assert ds[18].caption != a.caption or not np.array_equal(ds[18].image, a.image)
    assert ShapesWorldDataset(seed=4, length=50)[17].image.shape != a.image.shape or \
        not np.array_equal(ShapesWorldDataset(seed=4, length=50)[17].image, a.image)
    assert len(ds) == 50
    with pytest.raises(IndexError):
        ds[50]


def test_shapes_dataset_samples_link_boxes_to_phrases():
    det = ShapesWorldDataset(seed=0, length=20, grounding_fraction=0.0)
    for i in range(20):
        s = det[i]
        _check_sample(s)
        phrases = [s.caption[a:b] for (a, b), in s.phrase_spans]
        scene, _ = det.scene(i)
        assert len(s.boxes) == len(scene.objects)
        for box, j, o in zip(s.boxes, s.box_phrase, scene.objects):
            assert phrases[j] == o.shape
            np.testing.assert_allclose(box, o.box, rtol=1e-6)
        assert set(s.phrase_kinds) == {"shape"}
    grd = ShapesWorldDataset(seed=0, length=20, grounding_fraction=1.0, augment=False)
    kinds = set()
    for i in range(20):
        s = grd[i]
        _check_sample(s)
        kinds |= set(s.phrase_kinds)
    assert kinds <= {"colour", "size", "relation"} and "colour" in kinds


def test_plural_phrases_denote_every_object_of_their_shape():
    """Count questions name shapes in the plural ("how many crosses are there?"); the
    grounding data teaches those words with every object of the shape as their target."""
    seen_present = seen_absent = 0
    for i in range(60):
        rng = np.random.default_rng([5, i])
        scene = sw.sample_scene(rng)
        phrases = sw.plural_phrases(scene, rng)
        assert {p.kind for p in phrases} == {"plural"}
        for p in phrases:
            shape = next(s for s in sw.SHAPES if sw.PLURALS[s] == p.text)
            assert p.objects == [k for k, o in enumerate(scene.objects) if o.shape == shape]
            seen_present += bool(p.objects)
            seen_absent += not p.objects
        assert sum(not p.objects for p in phrases) == 1  # every scene lacks some shape
    assert seen_present > 30 and seen_absent == 60


def test_shapes_dataset_adds_plurals_only_when_asked():
    plain = ShapesWorldDataset(seed=2, length=40, grounding_fraction=1.0, augment=False)
    plural = ShapesWorldDataset(seed=2, length=40, grounding_fraction=1.0, augment=False, plurals=1.0)
    with_plurals = 0
    for i in range(12):
        a, b = plain[i], plural[i]
        _check_sample(b)
        np.testing.assert_array_equal(a.image, b.image)
        assert "plural" not in a.phrase_kinds
        phrases = [b.caption[x:y] for (x, y), in b.phrase_spans]
        kept = [p for p, k in zip(phrases, b.phrase_kinds) if k != "plural"]
        assert kept == [a.caption[x:y] for (x, y), in a.phrase_spans]  # the rest, in their order
        scene, _ = plural.scene(i)
        for j, kind in enumerate(b.phrase_kinds):
            if kind != "plural":
                continue
            with_plurals += 1
            shape = next(s for s in sw.SHAPES if sw.PLURALS[s] == phrases[j])
            boxes = b.boxes[b.box_phrase == j]
            want = [o.box for o in scene.objects if o.shape == shape]
            np.testing.assert_allclose(boxes.reshape(-1, 4), np.array(want, np.float32).reshape(-1, 4), rtol=1e-6)
    assert with_plurals >= 12
    # plurals=0 draws nothing extra: the samples of earlier runs stay what they were
    mixed = ShapesWorldDataset(seed=2, length=40, grounding_fraction=0.5)
    again = ShapesWorldDataset(seed=2, length=40, grounding_fraction=0.5, plurals=0.0)
    assert all(mixed[i].caption == again[i].caption for i in range(8))
    with pytest.raises(ValueError, match="plurals"):
        ShapesWorldDataset(seed=2, length=40, plurals=1.5)


def test_shapes_dataset_adds_relations_only_when_asked():
    """relations=1: every grounding sample gets up to EXTRA_RELATIONS more relation phrases,
    each denoting the objects of its subject on the named side of its anchor, none named
    twice; the sample's other phrases stay what they were."""
    plain = ShapesWorldDataset(seed=4, length=40, grounding_fraction=1.0, augment=False, plurals=0.5)
    more = ShapesWorldDataset(seed=4, length=40, grounding_fraction=1.0, augment=False, plurals=0.5, relations=1.0)
    added = 0
    for i in range(16):
        a, b = plain[i], more[i]
        _check_sample(b)
        np.testing.assert_array_equal(a.image, b.image)
        phrases = [b.caption[x:y] for (x, y), in b.phrase_spans]
        before = [a.caption[x:y] for (x, y), in a.phrase_spans]
        assert len(set(phrases)) == len(phrases)
        assert [p for p in phrases if p in before] == before  # the rest, in their order
        extra = [j for j, p in enumerate(phrases) if p not in before]
        assert len(extra) <= EXTRA_RELATIONS and all(b.phrase_kinds[j] == "relation" for j in extra)
        added += len(extra)
        scene, _ = more.scene(i)
        for j in extra:
            subject, rel, anchor = re.fullmatch(r"the (\w+ \w+) (left of|right of|above|below) the (\w+ \w+)",
                                                phrases[j]).groups()
            anchors = [o for o in scene.objects if f"{o.colour} {o.shape}" == anchor]
            assert len(anchors) == 1
            want = [o.box for o in scene.objects if f"{o.colour} {o.shape}" == subject
                    and sw._relation_offset(o, anchors[0], rel) > 0]
            boxes = b.boxes[b.box_phrase == j]
            np.testing.assert_allclose(boxes.reshape(-1, 4), np.array(want, np.float32).reshape(-1, 4), rtol=1e-6)
    assert added >= 16
    with pytest.raises(ValueError, match="relations"):
        ShapesWorldDataset(seed=2, length=40, relations=-0.1)


def test_scene_sample_names_an_extra_phrase_it_already_has_once():
    scene = sw.sample_scene(np.random.default_rng(1))
    image = sw.render(scene, np.random.default_rng(0))
    plain = scene_sample(scene, image, np.random.default_rng(2), True, 0)
    phrases = sw.grounding_phrases(scene, np.random.default_rng(2))
    again = scene_sample(scene, image, np.random.default_rng(2), True, 0, extra=[phrases[-1]])
    assert again.caption == plain.caption and len(again.boxes) == len(plain.boxes)


def test_scene_sample_gives_one_box_per_phrase_object():
    scene = sw.sample_scene(np.random.default_rng(1))
    s = scene_sample(scene, sw.render(scene, np.random.default_rng(0)), np.random.default_rng(2), True, 0)
    phrases = sw.grounding_phrases(scene, np.random.default_rng(2))
    assert s.caption == join_phrases([p.text for p in phrases])[0]
    assert len(s.boxes) == sum(len(p.objects) for p in phrases)
    for box, j in zip(s.boxes, s.box_phrase):
        assert any(np.allclose(box, scene.objects[i].box) for i in phrases[j].objects)


# ----------------------------------------------------------------------- fixtures
def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def _image(path, w=32, h=24, colour=(10, 200, 30)):
    Image.new("RGB", (w, h), colour).save(path)
    return path


@pytest.fixture
def coco(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.jpg")
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 24},
                       {"id": 2, "file_name": "b.jpg", "width": 32, "height": 24}],
            "categories": [{"id": 3, "name": "star"}, {"id": 1, "name": "circle"},
                           {"id": 7, "name": "traffic light"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 5]},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4]},
                            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 9, 9],
                             "iscrowd": 1},
                            {"id": 4, "image_id": 2, "category_id": 7, "bbox": [3, 3, 0, 4]}]}
    return _write(tmp_path / "instances.json", data), tmp_path, data


def test_coco_detection(coco):
    path, root, _ = coco
    ds = CocoDetectionDataset(path, root)
    assert len(ds) == 2
    s = ds[0]
    assert s.caption == "circle. star. traffic light."  # category id order
    names = [s.caption[a:b] for (a, b), in s.phrase_spans]
    np.testing.assert_allclose(s.boxes, [[1, 2, 11, 7], [0, 0, 4, 4]])  # crowd dropped
    assert [names[j] for j in s.box_phrase] == ["star", "circle"]
    assert s.image.shape == (24, 32, 3) and s.image_id == 1
    assert len(ds[1].boxes) == 0  # zero-size box dropped


def test_coco_sampled_prompt(coco):
    path, root, _ = coco
    ds = CocoDetectionDataset(path, root, prompt="sampled", seed=5)
    seen = set()
    for seed in range(12):
        ds.seed = seed
        s = ds[0]
        names = [s.caption[a:b] for (a, b), in s.phrase_spans]
        assert {"star", "circle"} <= set(names) and len(set(names)) == len(names)
        assert [names[j] for j in s.box_phrase] == ["star", "circle"]
        seen.add(s.caption)
        assert ds[0].caption == s.caption  # deterministic per (seed, index)
    assert len(seen) > 1


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("annotations"), "missing required key 'annotations'"),
    (lambda d: d["images"][0].pop("file_name"), "missing required key 'file_name'"),
    (lambda d: d["annotations"][0].update(image_id=99), "unknown image id 99"),
    (lambda d: d["annotations"][0].update(category_id=42), "unknown category id 42"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "bbox"),
    (lambda d: d["images"].append(dict(d["images"][0])), "duplicate image id"),
])
def test_coco_validation_errors(coco, edit, message):
    path, root, data = coco
    edit(data)
    _write(path, data)
    with pytest.raises(DatasetError, match=message) as e:
        CocoDetectionDataset(path, root)
    assert str(path) in str(e.value)


def test_missing_and_invalid_json(tmp_path):
    for cls in (CocoDetectionDataset, GroundingDataset, CaptionDataset):
        with pytest.raises(DatasetError, match="file not found"):
            cls(tmp_path / "nope.json", tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="invalid JSON") as e:
        GroundingDataset(bad, tmp_path)
    assert "bad.json" in str(e.value)
    with pytest.raises(DatasetError, match="file not found"):
        VqaDataset(tmp_path / "q.json", None, tmp_path)


def test_missing_and_unreadable_images(coco):
    path, root, _ = coco
    ds = CocoDetectionDataset(path, root)
    (root / "a.png").unlink()
    with pytest.raises(DatasetError, match="a.png: image file not found"):
        ds[0]
    (root / "b.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match="b.jpg: unreadable image"):
        ds[1]


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 10, 20))  # blue stripe on the left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    im.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    arr = load_image(tmp_path / "r.jpg")
    assert arr.shape == (40, 20, 3)          # displayed portrait
    assert arr[2, 10, 2] > 200 and arr[37, 10, 0] > 200  # stored left edge is now on top


# ----------------------------------------------------------------------- grounding
def _flickr_like(tmp_path):
    """Shaped like MDETR's final_flickr_separateGT_*.json (extra keys included)."""
    _image(tmp_path / "1000092795.jpg", 50, 40)
    caption = "Two young guys with shaggy hair look at their hands."
    data = {
        "images": [{"file_name": "1000092795.jpg", "height": 40, "width": 50, "id": 0,
                    "caption": caption, "dataset_name": "flickr", "tokens_negative": [[0, 51]],
                    "sentence_id": 0, "original_img_id": 1000092795,
                    "tokens_positive_eval": [[[0, 14]], [[20, 31]], [[40, 51]]]},
                   {"file_name": "1000092795.jpg", "height": 40, "width": 50, "id": 1,
                    "caption": caption, "dataset_name": "flickr", "sentence_id": 1,
                    "original_img_id": 1000092795}],
        "annotations": [
            {"area": 100, "iscrowd": 0, "image_id": 0, "category_id": 1, "id": 0,
             "bbox": [1, 2, 10, 10], "tokens_positive": [[0, 14]], "phrase_ids": 1},
            {"area": 100, "iscrowd": 0, "image_id": 0, "category_id": 1, "id": 1,
             "bbox": [20, 2, 10, 10], "tokens_positive": [[0, 14]]},
            {"area": 100, "iscrowd": 0, "image_id": 1, "category_id": 1, "id": 2,
             "bbox": [5, 5, 5, 5], "tokens_positive": [[40, 51]]},
            {"area": 100, "iscrowd": 0, "image_id": 1, "category_id": 1, "id": 3,
             "bbox": [6, 6, 5, 5], "tokens_positive": [[4, 9], [10, 14]]},
        ],
        "categories": [{"supercategory": "object", "id": 1, "name": "object"}],
    }
    return _write(tmp_path / "final_flickr_separateGT_val.json", data), data


def test_grounding_mdetr_format(tmp_path):
    path, _ = _flickr_like(tmp_path)
    ds = GroundingDataset(path, tmp_path)
    assert len(ds) == 2
    s = ds[0]
    _check_sample(s)
    assert [s.caption[a:b] for (a, b), in s.phrase_spans] == ["Two young guys", "shaggy hair",
                                                              "their hands"]
    np.testing.assert_array_equal(s.box_phrase, [0, 0])  # "shaggy hair" denotes nothing
    np.testing.assert_allclose(s.boxes[1], [20, 2, 30, 12])
    s = ds[1]  # no tokens_positive_eval: distinct annotation spans, in caption order
    assert s.phrase_spans == [[(4, 9), (10, 14)], [(40, 51)]]
    np.testing.assert_array_equal(s.box_phrase, [1, 0])


def test_grounding_links_by_overlap_and_keeps_kinds(tmp_path):
    path, data = _flickr_like(tmp_path)
    data["images"][0]["phrase_kinds"] = ["a", "b", "c"]
    data["annotations"][1]["tokens_positive"] = [[4, 14]]  # overlaps phrase 0 only
    data["annotations"].append({"image_id": 0, "bbox": [0, 0, 3, 3], "tokens_positive": [[32, 36]]})
    _write(path, data)
    s = GroundingDataset(path, tmp_path)[0]
    np.testing.assert_array_equal(s.box_phrase, [0, 0, 3])  # no overlap: a phrase of its own
    assert s.phrase_kinds == ["a", "b", "c", "other"]


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["annotations"][0].update(tokens_positive=[[40, 99]]), "outside the caption"),
    (lambda d: d["images"][0].update(tokens_positive_eval=[[[5, 2]]]), "outside the caption"),
    (lambda d: d["annotations"][0].update(image_id=7), "unknown image id 7"),
    (lambda d: d["annotations"][0].pop("tokens_positive"), "missing required key 'tokens_positive'"),
    (lambda d: d["images"][1].pop("caption"), "missing required key 'caption'"),
    (lambda d: d["images"][0].update(phrase_kinds=["x"]), "phrase_kinds"),
])
def test_grounding_validation_errors(tmp_path, edit, message):
    path, data = _flickr_like(tmp_path)
    edit(data)
    _write(path, data)
    with pytest.raises(DatasetError, match=message) as e:
        GroundingDataset(path, tmp_path)
    assert path.name in str(e.value)


# ----------------------------------------------------------------------- VQA, captions
def _vqa(tmp_path):
    _image(tmp_path / "COCO_val2014_000000000042.jpg")
    q = {"data_subtype": "val2014",
         "questions": [{"image_id": 42, "question": "What color is it?", "question_id": 420},
                       {"image_id": 42, "question": "Is it green?", "question_id": 421}]}
    a = {"annotations": [
        {"question_id": qid, "image_id": 42, "answer_type": "other", "multiple_choice_answer": ans,
         "answers": [{"answer": ans, "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)]}
        for qid, ans in ((420, "green"), (421, "yes"))]}
    return _write(tmp_path / "q.json", q), _write(tmp_path / "a.json", a), q, a


def test_vqa(tmp_path):
    qp, ap, _, _ = _vqa(tmp_path)
    ds = VqaDataset(qp, ap, tmp_path)  # image files found by the id ending the name
    s = ds[0]
    assert (s.question, s.question_id, s.image_id) == ("What color is it?", 420, 42)
    assert s.answers == ["green"] * 10 and s.image.shape == (24, 32, 3)
    assert VqaDataset(qp, None, tmp_path)[1].answers == []


@pytest.mark.parametrize("edit, message", [
    (lambda q, a: a["annotations"].pop(), "no annotation for 1 question"),
    (lambda q, a: a["annotations"][0].update(question_id=5), "unknown question id 5"),
    (lambda q, a: q["questions"][0].update(image_id=43), "unknown image id 43"),
    (lambda q, a: a["annotations"][0]["answers"][0].pop("answer"), "missing required key 'answer'"),
    (lambda q, a: q.pop("questions"), "missing required key 'questions'"),
])
def test_vqa_validation_errors(tmp_path, edit, message):
    qp, ap, q, a = _vqa(tmp_path)
    edit(q, a)
    _write(qp, q)
    _write(ap, a)
    with pytest.raises(DatasetError, match=message):
        VqaDataset(qp, ap, tmp_path)


def test_captions(tmp_path):
    _image(tmp_path / "x.png")
    data = {"images": [{"id": 5, "file_name": "x.png"}, {"id": 6, "file_name": "y.png"}],
            "annotations": [{"image_id": 5, "id": 1, "caption": "a red circle"},
                            {"image_id": 5, "id": 2, "caption": "one red circle"}]}
    path = _write(tmp_path / "captions.json", data)
    ds = CaptionDataset(path, tmp_path)
    assert len(ds) == 2 and ds[0].captions == ["a red circle", "one red circle"]
    with pytest.raises(DatasetError, match="y.png"):
        ds[1]
    data["annotations"].append({"image_id": 9, "id": 3, "caption": "x"})
    _write(path, data)
    with pytest.raises(DatasetError, match="unknown image id 9"):
        CaptionDataset(path, tmp_path)
