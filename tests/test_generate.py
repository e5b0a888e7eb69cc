"""training.generate writes a split that pycocotools and every loader read back."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from training import shapes_world as sw
from training.data import CaptionDataset, CocoDetectionDataset, GroundingDataset, VqaDataset
from training.generate import generate, main

N = 12
FILES = ("instances.json", "grounding.json", "vqa_questions.json", "vqa_annotations.json",
         "captions.json")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("val")
    main(["--out", str(out), "--split", "val", "--num-images", str(N), "--seed", "1",
          "--no-progress"])
    return out


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def test_files_and_images(split):
    for name in FILES:
        assert (split / name).is_file()
    images = json.loads((split / "instances.json").read_text())["images"]
    assert len(images) == N
    for im in images:
        assert (split / "images" / im["file_name"]).is_file()
        assert im["file_name"].startswith(f"{im['id']:06d}.")


def test_pycocotools_reads_and_scores_ground_truth(split):
    gt = _quiet(COCO, str(split / "instances.json"))
    assert sorted(c["name"] for c in gt.loadCats(gt.getCatIds())) == sorted(sw.SHAPES)
    assert gt.getCatIds() == [1, 2, 3, 4, 5, 6]
    anns = gt.loadAnns(gt.getAnnIds())
    assert all(a["colour"] in sw.COLOURS and a["iscrowd"] == 0 for a in anns)
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": 1.0} for a in anns]
    ev = COCOeval(gt, _quiet(gt.loadRes, dets), "bbox")
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    _quiet(ev.summarize)
    assert ev.stats[0] > 0.99  # the ground truth scores AP 1 against itself
    caps = _quiet(COCO, str(split / "captions.json"))
    assert len(caps.getAnnIds()) == 5 * N


def test_every_loader_reads_the_split(split):
    images = split / "images"
    det = CocoDetectionDataset(split / "instances.json", images)
    grd = GroundingDataset(split / "grounding.json", images)
    vqa = VqaDataset(split / "vqa_questions.json", split / "vqa_annotations.json", images)
    cap = CaptionDataset(split / "captions.json", images)
    assert len(det) == len(grd) == len(cap) == N and len(vqa) >= 4 * N
    for i in range(N):
        d, g, c = det[i], grd[i], cap[i]
        assert d.image.shape == g.image.shape == c.image.shape
        assert len(c.captions) == 5
        # every grounded box is one of the image's detection boxes
        for box in g.boxes:
            assert np.abs(d.boxes - box).max(1).min() < 1e-3
        assert g.phrase_kinds is not None and set(g.phrase_kinds) <= {"colour", "size", "relation"}
        assert len(g.phrase_kinds) == len(g.phrase_spans)
    answers = {a for k in range(len(vqa)) for a in vqa.answers[k]}
    assert {"yes", "no"} <= answers
    s = vqa[0]
    assert len(s.answers) == 10 and len(set(s.answers)) == 1


def test_boxes_match_the_scene(split):
    # the stored box is the scene's box (rounded to 0.01 px) and the image is the render
    ann = json.loads((split / "instances.json").read_text())
    img = next(im for im in ann["images"] if im["file_name"].endswith(".png"))  # lossless
    from training.generate import SPLIT_TAG
    rng = np.random.default_rng([1, img["id"] - 1, SPLIT_TAG["val"]])
    scene = sw.sample_scene(rng)
    pixels = sw.render(scene, rng)
    boxes = sorted(a["bbox"] for a in ann["annotations"] if a["image_id"] == img["id"])
    want = sorted([round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]
                  for x0, y0, x1, y1 in (o.box for o in scene.objects))
    np.testing.assert_allclose(boxes, want, atol=0.011)
    from training.data import load_image
    np.testing.assert_array_equal(load_image(split / "images" / img["file_name"]), pixels)


def test_val_is_reproducible_and_train_differs(split, tmp_path):
    again = generate(tmp_path / "again", "val", N, seed=1, progress=False)
    for name in FILES:
        assert (again / name).read_bytes() == (split / name).read_bytes()
    for f in (split / "images").iterdir():
        assert (again / "images" / f.name).read_bytes() == f.read_bytes()
    train = generate(tmp_path / "train", "train", N, seed=1, progress=False)
    assert (train / "instances.json").read_bytes() != (split / "instances.json").read_bytes()
    a = json.loads((train / "captions.json").read_text())["annotations"]
    b = json.loads((split / "captions.json").read_text())["annotations"]
    assert [x["caption"] for x in a] != [x["caption"] for x in b]
