"""training.evaluate: metric code checked against hand-known answers with oracle
predictors built from the annotation files (no model), plus the CLI's error paths and a
smoke run on a random tiny checkpoint."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from glipv2.postprocess import Detections
from training import generate
from training.data import load_image
from training.evaluate import (
    PhraseQuery,
    _coco_ap,
    average_precision,
    box_iou,
    colour_prompt_phrases,
    evaluate_detection,
    format_table,
    main,
    phrase_metrics,
    precision_recall,
)
from training.shapes_world import COLOURS, SHAPES

COLOUR_NAMES = list(COLOURS)


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "val"
    generate.main(["--out", str(out), "--split", "val", "--num-images", "6", "--seed", "7",
                   "--no-progress"])
    return out


def _xyxy(b):
    x, y, w, h = b
    return [x, y, x + w, y + h]


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def _shifted(box, shift, others):
    if shift == 0:
        return box
    b = np.asarray(box, float)
    w, h = b[2] - b[0], b[3] - b[1]
    for sx, sy in ((1, 1), (-1, -1), (1, -1), (-1, 1)):
        moved = b + shift * np.array([sx * w, sy * h, sx * w, sy * h])
        if box_iou(moved, np.asarray(others, float)).max() < 0.5:
            return moved.tolist()
    raise AssertionError(f"no shift of {box} avoids the other objects")


def make_oracle(val_dir: Path, shift: float = 0.0, swap_colours: bool = False, drop_images=()):
    """predict_fn answering from the annotation files: every phrase of the prompt gets the
    boxes of the objects it denotes (score 0.9). Images are recognised by their pixels.
    shift: boxes moved diagonally by shift x their width / height, in the first of the
    four diagonal directions that leaves IoU < 0.5 with every object of the image (so a
    moved box cannot land on a neighbour of the same shape by chance).
    swap_colours: each object is reported under the next colour (red -> green, ...), so
    every colour phrase names the wrong objects; shape phrases stay right.
    drop_images: file names for which the oracle returns nothing."""
    inst = json.loads((val_dir / "instances.json").read_text())
    gr = json.loads((val_dir / "grounding.json").read_text())
    files = {im["id"]: im["file_name"] for im in inst["images"]}
    cat = {c["id"]: c["name"] for c in inst["categories"]}
    by_digest = {_digest(load_image(val_dir / "images" / fn)): fn for fn in files.values()}

    det_truth: dict[str, dict[str, list]] = {fn: {} for fn in files.values()}
    objects: dict[str, list] = {fn: [] for fn in files.values()}
    combos = {f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES}
    for a in inst["annotations"]:
        fn, shape, colour = files[a["image_id"]], cat[a["category_id"]], a["colour"]
        objects[fn].append(_xyxy(a["bbox"]))
        if swap_colours:
            colour = COLOUR_NAMES[(COLOUR_NAMES.index(colour) + 1) % len(COLOUR_NAMES)]
        det_truth[fn].setdefault(shape, []).append(_xyxy(a["bbox"]))
        det_truth[fn].setdefault(f"{colour} {shape}", []).append(_xyxy(a["bbox"]))
    ground_truth: dict[str, dict[str, list]] = {fn: {} for fn in files.values()}
    entries = {e["id"]: e for e in gr["images"]}
    for e in gr["images"]:
        for spans in e["tokens_positive_eval"]:
            text = " ".join(e["caption"][s:t] for s, t in spans)
            ground_truth[e["file_name"]].setdefault(text, [])
    for a in gr["annotations"]:
        e = entries[a["image_id"]]
        text = " ".join(e["caption"][s:t] for s, t in a["tokens_positive"])
        ground_truth[e["file_name"]][text].append(_xyxy(a["bbox"]))

    def predict(images, prompts):
        out = []
        for image, prompt in zip(images, prompts):
            fn = by_digest[_digest(image)]
            boxes, pids = [], []
            if fn not in drop_images:
                for p, phrase in enumerate(prompt.phrases):
                    if phrase in combos or phrase in SHAPES:  # (possibly swapped) instances
                        found = det_truth[fn].get(phrase, [])
                    else:  # size / relation phrases
                        found = ground_truth[fn][phrase]
                    boxes += [_shifted(b, shift, objects[fn]) for b in found]
                    pids += [p] * len(found)
            b = np.asarray(boxes, np.float32).reshape(-1, 4)
            out.append(Detections(b, np.full(len(b), 0.9, np.float32), np.asarray(pids, np.int64)))
        return out

    return predict


# --------------------------------------------------------------------------- oracles
def test_perfect_oracle_scores_one(val_dir):
    m = evaluate_detection(make_oracle(val_dir), val_dir, batch_size=5, progress=False)
    assert m["num_images"] == 6
    assert m["shape_ap50"] == 1.0 and m["shape_ap"] == 1.0
    assert m["colour_ap50"] == 1.0 and m["colour_ap"] == 1.0
    assert m["recall@1"] == 1.0
    assert m["num_phrases"] > 0 and m["num_phrases/colour"] > 0
    for kind in ("colour", "size", "relation"):
        if m[f"num_phrases/{kind}"]:
            assert m[f"recall@1/{kind}"] == 1.0
            assert m[f"phrase_ap50/{kind}"] == 1.0
        else:
            assert math.isnan(m[f"recall@1/{kind}"])
    assert m["phrase_ap50"] == 1.0
    assert m["seconds"] > 0
    # every oracle box scores 0.9: all kept below it, none above it
    sweep = {r["threshold"]: r for r in m["precision_recall"]}
    assert sweep[0.85]["precision"] == 1.0 and sweep[0.85]["recall"] == 1.0
    assert sweep[0.95]["recall"] == 0.0
    assert m["f1_threshold"] <= 0.85 and m["f1@f1_threshold"] == 1.0
    table = format_table(m)
    assert "shape_ap50" in table and "recall@1/colour" in table
    widths = {len(line) for line in table.splitlines()}
    assert len(widths) == 1  # aligned


def test_max_images_restricts_ground_truth(val_dir):
    # GT of unevaluated images must not count as misses
    m = evaluate_detection(make_oracle(val_dir), val_dir, max_images=3, batch_size=1, progress=False)
    assert m["num_images"] == 3
    assert m["shape_ap50"] == 1.0 and m["colour_ap50"] == 1.0 and m["recall@1"] == 1.0


def test_shifted_boxes_score_zero(val_dir):
    # shifted by 0.6 of their size: IoU with their own object is 0.16/1.84 < 0.5
    m = evaluate_detection(make_oracle(val_dir, shift=0.6), val_dir, progress=False)
    assert m["shape_ap50"] == 0.0 and m["shape_ap"] == 0.0
    assert m["colour_ap50"] == 0.0
    assert m["recall@1"] == 0.0
    assert m["phrase_ap50"] == 0.0


def test_swapped_colours_fail_colour_but_not_shape(val_dir):
    m = evaluate_detection(make_oracle(val_dir, swap_colours=True), val_dir, progress=False)
    assert m["shape_ap50"] == 1.0
    # every box reported for "red circle" is some other-coloured circle (objects overlap
    # with IoU <= 0.3), so no colour detection is a true positive
    assert m["colour_ap50"] == 0.0
    assert m["recall@1/colour"] == 0.0


def test_partial_oracle_known_ap(val_dir):
    """Nothing predicted on half of the images: precision stays 1 up to recall r (the
    share of GT on the other images), so AP50 = #{t in 0, .01, .., 1 : t <= r} / 101."""
    inst = json.loads((val_dir / "instances.json").read_text())
    dropped = {im["file_name"] for im in inst["images"] if im["id"] % 2 == 0}
    ids = {im["id"] for im in inst["images"] if im["file_name"] in dropped}
    n_gt = len(inst["annotations"])
    r = sum(a["image_id"] not in ids for a in inst["annotations"]) / n_gt
    assert 0 < r < 1
    m = evaluate_detection(make_oracle(val_dir, drop_images=dropped), val_dir, progress=False)
    # shape AP50 is the mean over the 6 categories of each one's recall-capped AP
    per_cat = []
    for cid in {a["category_id"] for a in inst["annotations"]}:
        anns = [a for a in inst["annotations"] if a["category_id"] == cid]
        rc = sum(a["image_id"] not in ids for a in anns) / len(anns)
        per_cat.append(np.sum(np.linspace(0, 1, 101) <= rc + 1e-12) / 101 if rc > 0 else 0.0)
    assert m["shape_ap50"] == pytest.approx(float(np.mean(per_cat)), abs=1e-9)


def test_colour_prompt_is_deterministic_and_balanced():
    present = {("red", "circle"), ("blue", "star"), ("green", "cross")}
    a = colour_prompt_phrases(5, present)
    assert a == colour_prompt_phrases(5, present)
    assert len(a) == 6 and len(set(a)) == 6
    assert {"red circle", "blue star", "green cross"} <= set(a)
    assert colour_prompt_phrases(6, present) != a  # other image, other distractors/order
    one = colour_prompt_phrases(1, {("red", "circle")})
    assert len(one) == 3  # at least 2 distractors
    for p in a:
        c, s = p.split(" ")
        assert c in COLOURS and s in SHAPES


# --------------------------------------------------------------------------- numpy AP
def test_average_precision_hand_example():
    # 2 GT; TP (0.9), FP (0.8), TP (0.7): precision 1 up to recall .5, then 2/3 up to 1
    ap = average_precision(np.array([0.8, 0.9, 0.7]), np.array([False, True, True]), 2)
    assert ap == pytest.approx((51 * 1.0 + 50 * 2 / 3) / 101)
    assert average_precision(np.zeros(0), np.zeros(0, bool), 3) == 0.0
    assert math.isnan(average_precision(np.zeros(0), np.zeros(0, bool), 0))


def test_recall_at_1_uses_the_top_detection():
    gt = np.array([[0, 0, 10, 10]], float)
    q = PhraseQuery("colour", gt, np.array([[50, 50, 60, 60], [0, 0, 10, 10]], float),
                    np.array([0.9, 0.8]))
    m = phrase_metrics([q])
    assert m["recall@1/colour"] == 0.0 and m["recall@1"] == 0.0
    assert m["phrase_ap50/colour"] == pytest.approx(np.sum(np.linspace(0, 1, 101) <= 1) * 0.5 / 101)
    # a negative phrase (no GT) is a query whose detections are false positives
    neg = PhraseQuery("colour", np.zeros((0, 4)), np.array([[0, 0, 5, 5]], float), np.array([0.95]))
    hit = PhraseQuery("colour", gt, gt.copy(), np.array([0.5]))
    m = phrase_metrics([neg, hit])
    assert m["recall@1/colour"] == 1.0 and m["num_phrases/colour"] == 1
    assert m["phrase_ap50/colour"] == pytest.approx(0.5)
    assert math.isnan(m["phrase_ap50/size"]) and m["phrase_ap50"] == pytest.approx(0.5)


def test_numpy_ap50_matches_pycocotools():
    """Each query is an 'image' of a single category: the numpy AP50 equals COCOeval's."""
    rng = np.random.default_rng(0)
    queries, gt, dt, images = [], [], [], []
    for qid in range(1, 41):
        g = rng.integers(0, 4)
        xy = rng.uniform(0, 200, (g, 2))
        gtb = np.concatenate([xy, xy + rng.uniform(10, 60, (g, 2))], 1)
        jitter = rng.normal(0, 6, (g, 4))
        extra = rng.integers(0, 4)
        exy = rng.uniform(0, 200, (extra, 2))
        dtb = np.concatenate([gtb + jitter, np.concatenate([exy, exy + 30], 1)], 0)
        keep = rng.random(len(dtb)) < 0.85
        dtb = dtb[keep]
        dtb[:, 2:] = np.maximum(dtb[:, 2:], dtb[:, :2] + 1)
        scores = rng.random(len(dtb))
        queries.append(PhraseQuery("colour", gtb, dtb, scores))
        images.append({"id": qid, "width": 300, "height": 300})
        gt += [{"image_id": qid, "category_id": 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]} for b in gtb]
        dt += [{"image_id": qid, "category_id": 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s}
               for b, s in zip(dtb, scores)]
    ours = phrase_metrics(queries)["phrase_ap50/colour"]
    _, coco_ap50 = _coco_ap(images, [{"id": 1, "name": "q"}], gt, dt)
    assert 0.05 < ours < 0.99
    assert ours == pytest.approx(coco_ap50, abs=1e-9)


# --------------------------------------------------------------------------- CLI
def test_cli_missing_checkpoint(val_dir, tmp_path, capsys):
    path = tmp_path / "nope.pt"
    assert main(["--checkpoint", str(path), "--data", str(val_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_corrupt_checkpoint(val_dir, tmp_path, capsys):
    path = tmp_path / "bad.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    assert main(["--checkpoint", str(path), "--data", str(val_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and len(err.strip().splitlines()) == 1


def test_cli_missing_val_dir(tmp_path, capsys):
    ckpt = tmp_path / "x.pt"
    ckpt.write_bytes(b"\0" * 16)
    missing = tmp_path / "no_such_val"
    assert main(["--checkpoint", str(ckpt), "--data", str(missing), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and len(err.strip().splitlines()) == 1


def test_cli_missing_file_in_val_dir(val_dir, tmp_path, capsys):
    broken = tmp_path / "val"
    shutil.copytree(val_dir, broken)
    (broken / "grounding.json").unlink()
    ckpt = tmp_path / "x.pt"
    ckpt.write_bytes(b"\0" * 16)
    assert main(["--checkpoint", str(ckpt), "--data", str(broken), "--no-progress"]) == 2
    assert "grounding.json" in capsys.readouterr().err
    shutil.copy(val_dir / "grounding.json", broken / "grounding.json")
    (broken / "instances.json").write_text("{not json")
    assert main(["--checkpoint", str(ckpt), "--data", str(broken), "--no-progress"]) == 2
    assert "instances.json" in capsys.readouterr().err


def test_cli_smoke_random_tiny_model(val_dir, tmp_path, capsys):
    import glipv2.checkpoint as ck
    from glipv2.config import get_preset
    from glipv2.modeling.glipv2 import build_model

    cfg = get_preset("tiny").replace(image_hw=(128, 128))
    model = build_model(cfg)
    path = tmp_path / "tiny.pt"
    ck.atomic_save({"format": ck.FORMAT, "model_config": cfg.to_dict(),
                    "model": ck.model_state(model, cfg)}, path)
    out = tmp_path / "m" / "metrics.json"
    rc = main(["--checkpoint", str(path), "--data", str(val_dir), "--max-images", "2",
               "--batch-size", "4", "--out", str(out), "--no-progress"])
    assert rc == 0
    assert "shape_ap50" in capsys.readouterr().out
    def no_nan(c):
        raise AssertionError(f"non-standard JSON constant {c}")

    metrics = json.loads(out.read_text(), parse_constant=no_nan)  # NaN must be written as null
    assert metrics["num_images"] == 2
    for key in ("shape_ap", "shape_ap50", "colour_ap", "colour_ap50"):
        assert 0.0 <= metrics[key] <= 1.0


def test_precision_recall_hand_example():
    gt = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
          {"image_id": 1, "category_id": 1, "bbox": [20, 0, 10, 10]}]
    dt = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.8},
          {"image_id": 1, "category_id": 1, "bbox": [1, 0, 10, 10], "score": 0.6},  # duplicate: a false positive
          {"image_id": 1, "category_id": 2, "bbox": [20, 0, 10, 10], "score": 0.4},  # other category
          {"image_id": 1, "category_id": 1, "bbox": [20, 0, 10, 10], "score": 0.2}]
    rows = {r["threshold"]: r for r in precision_recall([(gt, dt)], thresholds=(0.1, 0.5, 0.7, 0.9))}
    assert (rows[0.7]["precision"], rows[0.7]["recall"]) == (1.0, 0.5)
    assert (rows[0.5]["precision"], rows[0.5]["recall"]) == (0.5, 0.5)
    assert (rows[0.1]["precision"], rows[0.1]["recall"]) == (0.5, 1.0)
    assert (rows[0.9]["precision"], rows[0.9]["recall"]) == (0.0, 0.0)
    assert rows[0.1]["f1"] == pytest.approx(2 * 0.5 / 1.5)


def test_cli_tasks_the_checkpoint_lacks_say_why(val_dir, tmp_path, capsys):
    import glipv2.checkpoint as ck
    from glipv2.config import get_preset
    from glipv2.modeling.glipv2 import build_model

    cfg = get_preset("tiny").replace(image_hw=(128, 128))
    path = tmp_path / "det_only.pt"
    ck.atomic_save({"format": ck.FORMAT, "model_config": cfg.to_dict(),
                    "model": ck.model_state(build_model(cfg), cfg)}, path)
    assert main(["--checkpoint", str(path), "--data", str(val_dir), "--tasks", "vqa", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "has no vqa head" in err and "--loss-vqa 1" in err and "--tasks detection" in err, err
