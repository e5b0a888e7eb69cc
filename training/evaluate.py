"""Evaluate a detector on a shapes-world val split (the generator's output directory).

    python -m training.evaluate --checkpoint runs/x/best.pt --data data/shapes/val \
        [--max-images N] [--batch-size 8] [--out metrics.json]

Three families of prompts are run on every evaluated image (one predict call can mix
them; each query is an (image, prompt) pair):

1. Shape prompts: "circle. square. triangle. star. hexagon. cross." (fixed order). COCO
   box AP (0.50:0.95) and AP50 with pycocotools against instances.json, restricted to
   the evaluated images -> `shape_ap`, `shape_ap50`.
2. Colour-qualified phrases: the 36 (colour, shape) combos are the categories. The prompt
   lists the combos present in the image plus max(2, #present) absent combos, chosen and
   shuffled by a generator seeded with (COLOUR_PROMPT_SEED, image id). Ground truth =
   instances with their "colour" key. pycocotools AP50 / AP (COCO averages over the
   categories that have ground truth) -> `colour_ap50`, `colour_ap`.
3. Grounding phrases from grounding.json: prompt = prompt_from_spans(caption,
   tokens_positive_eval). Every (entry, phrase) is one query.
   - recall@1 (queries with >= 1 GT box): the phrase's top-scoring detection has IoU
     >= 0.5 with one of its GT boxes (no detection = miss). Per kind and overall.
   - AP50 per kind (numpy, COCO semantics; see `phrase_ap50`): each kind is one
     category and each query is an "image" of it, so detections for phrases that denote
     nothing (negative phrases, empty relations) count as false positives, as detections
     of a category on an image without it do in COCO. `phrase_ap50` is their mean over
     kinds with GT (COCO's mean over categories).

Images are read with the project's loaders (training.data): CocoDetectionDataset for the
images and instances, GroundingDataset for the grounding entries (matched to images by
file name). All file problems surface as training.data.DatasetError.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from glipv2.captioning import DEFAULT_BEAM
from glipv2.postprocess import Detections
from glipv2.text import Prompt, PromptError, build_prompt, prompt_from_spans
from training.data import CocoDetectionDataset, DatasetError, GroundingDataset, load_json
from training.shapes_world import COLOURS, SHAPES

__all__ = [
    "PredictFn",
    "COLOUR_PROMPT_SEED",
    "PHRASE_KINDS",
    "colour_category_id",
    "colour_prompt_phrases",
    "PhraseQuery",
    "box_iou",
    "average_precision",
    "phrase_metrics",
    "evaluate_detection",
    "format_table",
    "main",
]

PredictFn = Callable[[Sequence[np.ndarray], Sequence[Prompt]], Sequence[Detections]]

COLOUR_PROMPT_SEED = 20240611
PHRASE_KINDS: tuple[str, ...] = ("colour", "size", "relation")  # always reported
IOU_THRESHOLD = 0.5
MAX_DETS = 100  # COCO's per-image, per-category cap
_REC_THRESHOLDS = np.linspace(0.0, 1.0, 101)
_COLOUR_NAMES = tuple(COLOURS)


# --------------------------------------------------------------------------- helpers
def colour_category_id(colour: str, shape: str) -> int:
    """1..36: colours in shapes_world.COLOURS order, shapes in SHAPES order."""
    return _COLOUR_NAMES.index(colour) * len(SHAPES) + SHAPES.index(shape) + 1


def _colour_categories() -> list[dict]:
    return [{"id": colour_category_id(c, s), "name": f"{c} {s}"} for c in _COLOUR_NAMES for s in SHAPES]


def colour_prompt_phrases(image_id: int, present: set[tuple[str, str]]) -> list[str]:
    """The colour prompt of an image: its present (colour, shape) combos plus
    max(2, len(present)) absent ones, shuffled; a pure function of (image id, present)."""
    rng = np.random.default_rng([COLOUR_PROMPT_SEED, int(image_id)])
    present_sorted = sorted(present, key=lambda cs: colour_category_id(*cs))
    absent = [(c, s) for c in _COLOUR_NAMES for s in SHAPES if (c, s) not in present]
    k = min(max(2, len(present_sorted)), len(absent))
    distractors = [absent[j] for j in rng.permutation(len(absent))[:k]]
    chosen = present_sorted + distractors
    return [f"{c} {s}" for c, s in (chosen[j] for j in rng.permutation(len(chosen)))]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N, M] IoU of xyxy boxes (continuous coordinates, as pycocotools)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _xywh(box: Sequence[float]) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def _nan_to_none(v: object) -> object:
    return None if isinstance(v, float) and math.isnan(v) else v


# --------------------------------------------------------------------------- score threshold
# The thresholds a precision/recall sweep reports (what a user would set in the API).
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))


def _true_positives(gt: list[dict], dt: list[dict], iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(scores, tp) of every detection: greedy matching in score order per (image,
    category), IoU >= iou_threshold, each ground-truth box matched once. Matching in score
    order makes "tp among detections above t" the same as matching only those."""
    by_key: dict[tuple[int, int], list[list[float]]] = {}
    for a in gt:
        x, y, w, h = a["bbox"]
        by_key.setdefault((a["image_id"], a["category_id"]), []).append([x, y, x + w, y + h])
    order = sorted(range(len(dt)), key=lambda i: -dt[i]["score"])
    used: dict[tuple[int, int], np.ndarray] = {k: np.zeros(len(v), bool) for k, v in by_key.items()}
    scores, tp = np.zeros(len(dt)), np.zeros(len(dt), bool)
    for n, i in enumerate(order):
        d = dt[i]
        key = (d["image_id"], d["category_id"])
        scores[n] = d["score"]
        if key not in by_key:
            continue
        x, y, w, h = d["bbox"]
        ious = box_iou(np.array([[x, y, x + w, y + h]]), np.array(by_key[key]))[0]
        ious[used[key]] = -1
        j = int(np.argmax(ious))
        if ious[j] >= iou_threshold:
            used[key][j], tp[n] = True, True
    return scores, tp


def precision_recall(pairs: Sequence[tuple[list[dict], list[dict]]],
                     thresholds: Sequence[float] = THRESHOLDS) -> list[dict[str, float]]:
    """Precision, recall and F1 of the detections scoring above t, for each threshold t, over
    (ground truth, detections) pairs of COCO-style records (bbox xywh)."""
    scores, tp, num_gt = [], [], 0
    for gt, dt in pairs:
        s, t = _true_positives(gt, dt)
        scores.append(s)
        tp.append(t)
        num_gt += len(gt)
    s, t = np.concatenate(scores), np.concatenate(tp)
    rows = []
    for thr in thresholds:
        kept = s > thr  # as the postprocess: detections scoring above the threshold
        hits = int((t & kept).sum())
        precision = hits / max(1, int(kept.sum()))
        recall = hits / max(1, num_gt)
        f1 = 2 * precision * recall / max(precision + recall, 1e-12)
        rows.append({"threshold": float(thr), "precision": precision, "recall": recall, "f1": f1})
    return rows


# --------------------------------------------------------------------------- COCO (pycocotools)
def _coco(images: list[dict], categories: list[dict], anns: list[dict]):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _coco_ap(images: list[dict], categories: list[dict], gt: list[dict],
             dt: list[dict]) -> tuple[float, float]:
    """(AP@[.5:.95], AP50) of box detections via pycocotools, NaN when there is no GT.
    gt/dt: dicts with image_id, category_id, bbox (xywh) [, score]."""
    from pycocotools.cocoeval import COCOeval

    if not gt:
        return math.nan, math.nan
    gt_anns = []
    for k, a in enumerate(gt, 1):
        w, h = a["bbox"][2], a["bbox"][3]
        gt_anns.append({"id": k, "image_id": a["image_id"], "category_id": a["category_id"],
                        "bbox": list(a["bbox"]), "area": float(a.get("area") or w * h),
                        "iscrowd": int(a.get("iscrowd", 0))})
    dt_anns = [{"id": k, "image_id": d["image_id"], "category_id": d["category_id"],
                "bbox": list(d["bbox"]), "score": float(d["score"]),
                "area": float(d["bbox"][2] * d["bbox"][3]), "iscrowd": 0}
               for k, d in enumerate(dt, 1)]
    coco_gt = _coco(images, categories, gt_anns)
    coco_dt = _coco(images, categories, dt_anns)
    ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
    ev.params.imgIds = [im["id"] for im in images]
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap, ap50 = float(ev.stats[0]), float(ev.stats[1])
    # -1 means "no category with GT" (cannot happen with gt non-empty, but stay safe)
    return (math.nan if ap < 0 else ap), (math.nan if ap50 < 0 else ap50)


# --------------------------------------------------------------------------- phrase metrics
@dataclass
class PhraseQuery:
    """One grounding (entry, phrase): its kind, GT boxes [G, 4] and detections."""

    kind: str
    gt_boxes: np.ndarray       # float [G, 4] xyxy
    det_boxes: np.ndarray      # float [D, 4] xyxy
    det_scores: np.ndarray     # float [D]


def _match(query: PhraseQuery, iou_threshold: float = IOU_THRESHOLD,
           max_dets: int = MAX_DETS) -> tuple[np.ndarray, np.ndarray]:
    """COCO greedy matching within one query: detections by descending score (capped at
    max_dets); each takes the still-unmatched GT with the highest IoU >= threshold.
    Returns (scores, is_true_positive) of the kept detections."""
    scores = np.asarray(query.det_scores, np.float64).reshape(-1)
    order = np.argsort(-scores, kind="mergesort")[:max_dets]
    scores = scores[order]
    tp = np.zeros(len(order), bool)
    gt = np.asarray(query.gt_boxes, np.float64).reshape(-1, 4)
    if len(gt) and len(order):
        ious = box_iou(np.asarray(query.det_boxes, np.float64).reshape(-1, 4)[order], gt)
        taken = np.zeros(len(gt), bool)
        thr = min(iou_threshold, 1 - 1e-10)
        for d in range(len(order)):
            cand = np.where(taken, -1.0, ious[d])
            g = int(np.argmax(cand))
            if cand[g] >= thr:
                taken[g] = True
                tp[d] = True
    return scores, tp


def average_precision(scores: np.ndarray, tp: np.ndarray, num_gt: int) -> float:
    """COCO's 101-point interpolated AP of pooled detections: sort by score (stable),
    precision made monotone from the right, sampled at recall 0, 0.01, ..., 1 (the first
    point reaching each recall; 0 beyond the highest recall reached). NaN without GT."""
    if num_gt <= 0:
        return math.nan
    order = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")
    tp = np.asarray(tp, bool)[order]
    if tp.size == 0:
        return 0.0
    tps = np.cumsum(tp).astype(np.float64)
    fps = np.cumsum(~tp).astype(np.float64)
    recall = tps / num_gt
    precision = tps / np.maximum(tps + fps, np.finfo(np.float64).eps)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, _REC_THRESHOLDS, side="left")
    sampled = np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0)
    return float(sampled.mean())


def phrase_metrics(queries: Sequence[PhraseQuery]) -> dict[str, float]:
    """recall@1 and AP50 per phrase kind (see the module doc), plus counts."""
    kinds = list(PHRASE_KINDS) + sorted({q.kind for q in queries} - set(PHRASE_KINDS))
    out: dict[str, float] = {}
    hits_all, n_all = 0, 0
    aps = []
    for kind in kinds:
        qs = [q for q in queries if q.kind == kind]
        hits, n, num_gt = 0, 0, 0
        all_scores, all_tp = [], []
        for q in qs:
            scores, tp = _match(q)
            all_scores.append(scores)
            all_tp.append(tp)
            g = len(np.asarray(q.gt_boxes).reshape(-1, 4))
            num_gt += g
            if g:
                n += 1
                if len(q.det_scores):
                    top = int(np.argmax(np.asarray(q.det_scores, np.float64)))
                    hit = box_iou(np.asarray(q.det_boxes).reshape(-1, 4)[top], q.gt_boxes).max() >= IOU_THRESHOLD
                    hits += int(hit)
        ap = average_precision(np.concatenate(all_scores) if all_scores else np.zeros(0),
                               np.concatenate(all_tp) if all_tp else np.zeros(0, bool), num_gt)
        out[f"recall@1/{kind}"] = hits / n if n else math.nan
        out[f"phrase_ap50/{kind}"] = ap
        out[f"num_phrases/{kind}"] = n
        hits_all += hits
        n_all += n
        if not math.isnan(ap):
            aps.append(ap)
    out["recall@1"] = hits_all / n_all if n_all else math.nan
    out["phrase_ap50"] = float(np.mean(aps)) if aps else math.nan
    out["num_phrases"] = n_all
    return out


# --------------------------------------------------------------------------- the split
@dataclass
class _Split:
    det: CocoDetectionDataset
    grounding: GroundingDataset
    instances: dict                         # raw instances.json
    shape_cat: dict[str, int]               # shape name -> instances category id
    colour_of: dict[int, list]              # image id -> [(xywh, colour, shape)]
    entries_by_file: dict[str, list[int]]   # file name -> grounding entry indices


def check_split(val_dir: str | os.PathLike) -> Path:
    """The files an evaluation reads exist (cheap: training calls it before its first step)."""
    root = Path(val_dir)
    hint = f"; generate it with: .venv/bin/python -m training.generate --out {root} --split val --num-images 500 --seed 1"
    if not root.is_dir():
        raise DatasetError(f"{root}: val directory not found{hint}")
    for name in ("instances.json", "grounding.json"):
        if not (root / name).is_file():
            raise DatasetError(f"{root / name}: file not found{hint}")
    if not (root / "images").is_dir():
        raise DatasetError(f"{root / 'images'}: image directory not found{hint}")
    return root


def _open_split(val_dir: str | os.PathLike) -> _Split:
    root = check_split(val_dir)
    det = CocoDetectionDataset(root / "instances.json", root / "images")
    grounding = GroundingDataset(root / "grounding.json", root / "images")
    instances = load_json(root / "instances.json")
    path = root / "instances.json"

    by_name = {name: cid for cid, name in det.categories.items()}
    missing = [s for s in SHAPES if s not in by_name]
    if missing:
        raise DatasetError(f"{path}: no category named {missing[0]!r} (expected the shapes {list(SHAPES)})")
    shape_of = {cid: name for cid, name in det.categories.items()}
    colour_of: dict[int, list] = {iid: [] for iid in det.image_ids}
    for k, a in enumerate(instances["annotations"]):  # types validated by the loader
        colour = a.get("colour")
        if colour not in COLOURS:
            raise DatasetError(f"{path}: annotations[{k}] has no valid 'colour' (got {colour!r}); "
                               f"is this a shapes-world split?")
        shape = shape_of[a["category_id"]]
        if shape not in SHAPES:
            raise DatasetError(f"{path}: annotations[{k}]: category {shape!r} is not a shape")
        if a.get("iscrowd", 0) or a["bbox"][2] <= 0 or a["bbox"][3] <= 0:
            continue
        colour_of[a["image_id"]].append(([float(v) for v in a["bbox"]], colour, shape))

    entries_by_file: dict[str, list[int]] = {}
    for j, rec in enumerate(grounding.entries):
        entries_by_file.setdefault(rec["file_name"], []).append(j)
    return _Split(det, grounding, instances, {s: by_name[s] for s in SHAPES}, colour_of, entries_by_file)


# --------------------------------------------------------------------------- evaluation
def evaluate_detection(predict_fn: PredictFn, val_dir: str | os.PathLike,
                       max_images: int | None = None, batch_size: int = 8,
                       progress: bool = True) -> dict:
    """Run the three prompt families over a val split; see the module doc for the metric
    definitions. predict_fn(images, prompts) -> one Detections per image (boxes xyxy in
    original pixels, phrase_ids index the prompt's phrases), e.g. TorchPredictor.predict.
    batch_size counts (image, prompt) queries per predict_fn call."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    t0 = time.perf_counter()
    split = _open_split(val_dir)
    n_images = len(split.det) if max_images is None else min(max_images, len(split.det))
    shape_prompt = build_prompt(list(SHAPES))
    shape_cids = [split.shape_cat[s] for s in SHAPES]

    shape_dt: list[dict] = []
    colour_dt: list[dict] = []
    phrase_queries: list[PhraseQuery] = []

    # pending queries: (image, prompt, handler(Detections))
    pending: list[tuple[np.ndarray, Prompt, Callable[[Detections], None]]] = []

    def flush(force: bool) -> None:
        while pending and (force or len(pending) >= batch_size):
            chunk = pending[:batch_size]
            del pending[:batch_size]
            dets = list(predict_fn([c[0] for c in chunk], [c[1] for c in chunk]))
            if len(dets) != len(chunk):
                raise RuntimeError(f"predict_fn returned {len(dets)} results for {len(chunk)} images")
            for (_, _, handle), d in zip(chunk, dets):
                handle(d)

    def det_records(d: Detections, image_id: int, cids: Sequence[int], out: list[dict]) -> None:
        boxes = np.asarray(d.boxes, np.float64).reshape(-1, 4)
        for box, score, pid in zip(boxes, np.asarray(d.scores).reshape(-1), np.asarray(d.phrase_ids).reshape(-1)):
            out.append({"image_id": image_id, "category_id": int(cids[int(pid)]),
                        "bbox": _xywh(box), "score": float(score)})

    def grounding_handler(phrase_gt: list[np.ndarray], kinds: list[str]):
        def handle(d: Detections) -> None:
            pids = np.asarray(d.phrase_ids).reshape(-1)
            boxes = np.asarray(d.boxes, np.float64).reshape(-1, 4)
            scores = np.asarray(d.scores, np.float64).reshape(-1)
            for p, (gt, kind) in enumerate(zip(phrase_gt, kinds)):
                sel = pids == p
                phrase_queries.append(PhraseQuery(kind, gt, boxes[sel], scores[sel]))
        return handle

    images_meta: list[dict] = []
    n_entries = 0
    bar = tqdm(total=n_images, desc="evaluate", unit="img", disable=not progress)
    try:
        for i in range(n_images):
            sample = split.det[i]
            iid = split.det.image_ids[i]
            image = sample.image
            h, w = image.shape[:2]
            images_meta.append({"id": iid, "width": int(w), "height": int(h)})

            # 1. shape prompt
            pending.append((image, shape_prompt,
                            lambda d, iid=iid: det_records(d, iid, shape_cids, shape_dt)))
            # 2. colour prompt
            present = {(c, s) for _, c, s in split.colour_of[iid]}
            texts = colour_prompt_phrases(iid, present)
            cids = [colour_category_id(*t.split(" ", 1)) for t in texts]
            pending.append((image, build_prompt(texts),
                            lambda d, iid=iid, cids=cids: det_records(d, iid, cids, colour_dt)))
            # 3. grounding entries of this image
            for j in split.entries_by_file.get(split.det.files[iid], []):
                g = split.grounding[j]
                if not g.phrase_spans:
                    continue
                try:
                    prompt = prompt_from_spans(g.caption, g.phrase_spans)
                except PromptError as e:
                    raise DatasetError(f"{split.grounding.path}: entry id {g.image_id}: {e}") from e
                kinds = list(g.phrase_kinds) if g.phrase_kinds is not None else ["other"] * len(prompt)
                gt = [g.boxes[g.box_phrase == p].astype(np.float64) for p in range(len(prompt))]
                pending.append((g.image, prompt, grounding_handler(gt, kinds)))
                n_entries += 1
            flush(force=False)
            bar.update(1)
        flush(force=True)
    finally:
        bar.close()

    eval_ids = {m["id"] for m in images_meta}
    shape_gt = [a for a in split.instances["annotations"] if a["image_id"] in eval_ids]
    shape_ap, shape_ap50 = _coco_ap(images_meta, [{"id": c, "name": s} for s, c in split.shape_cat.items()],
                                    shape_gt, shape_dt)
    colour_gt = [{"image_id": iid, "category_id": colour_category_id(c, s), "bbox": box}
                 for iid in sorted(eval_ids) for box, c, s in split.colour_of[iid]]
    colour_ap, colour_ap50 = _coco_ap(images_meta, _colour_categories(), colour_gt, colour_dt)

    metrics: dict = {
        "num_images": n_images,
        "shape_ap": shape_ap,
        "shape_ap50": shape_ap50,
        "colour_ap": colour_ap,
        "colour_ap50": colour_ap50,
    }
    # The score threshold a user should start from: best F1 over the shape prompts and the
    # colour-qualified prompts (which name absent objects too), as the API would see them.
    sweep = precision_recall([(shape_gt, shape_dt), (colour_gt, colour_dt)])
    best = max(sweep, key=lambda r: r["f1"])
    metrics.update({"f1_threshold": best["threshold"], "precision@f1_threshold": best["precision"],
                    "recall@f1_threshold": best["recall"], "f1@f1_threshold": best["f1"]})
    metrics["precision_recall"] = sweep
    metrics.update(phrase_metrics(phrase_queries))
    metrics["num_grounding_entries"] = n_entries
    metrics["seconds"] = time.perf_counter() - t0
    return metrics


# --------------------------------------------------------------------------- reporting
_ORDER = ("num_images", "shape_ap", "shape_ap50", "colour_ap", "colour_ap50",
          "recall@1", "phrase_ap50", "vqa_accuracy", "caption_bleu4", "caption_cider", "caption_shape_recall",
          "caption_pair_recall")


def format_table(metrics: dict) -> str:
    """Two aligned columns, headline metrics first, then per-kind phrase metrics grouped
    by kind, then the rest. NaN (nothing to measure) shows as "n/a"."""
    keys = [k for k in _ORDER if k in metrics]
    kinds = sorted({k.split("/", 1)[1] for k in metrics if "/" in k},
                   key=lambda s: (PHRASE_KINDS.index(s) if s in PHRASE_KINDS else len(PHRASE_KINDS), s))
    for kind in kinds:
        keys += [k for k in (f"recall@1/{kind}", f"phrase_ap50/{kind}", f"num_phrases/{kind}") if k in metrics]
    keys += [k for k in metrics if k not in keys and not isinstance(metrics[k], list)]

    def fmt(k: str, v: object) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "n/a"
        if isinstance(v, bool) or isinstance(v, (int, np.integer)):
            return str(int(v))
        if isinstance(v, (float, np.floating)):
            return f"{v:.2f}" if k == "seconds" else f"{v:.4f}"
        return str(v)

    rows = [("metric", "value")] + [(k, fmt(k, metrics[k])) for k in keys]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{rows[0][0]:<{w0}}  {rows[0][1]:>{w1}}", f"{'-' * w0}  {'-' * w1}"]
    lines += [f"{k:<{w0}}  {v:>{w1}}" for k, v in rows[1:]]
    return "\n".join(lines)


def format_precision_recall(rows: Sequence[dict[str, float]]) -> str:
    """The threshold sweep as a table (what each API score_threshold would give)."""
    lines = ["score_threshold  precision  recall     f1   (shape + colour-qualified prompts, IoU 0.5)"]
    lines += [f"{r['threshold']:>15.2f}  {r['precision']:>9.3f}  {r['recall']:>6.3f}  {r['f1']:>5.3f}" for r in rows]
    return "\n".join(lines)


def evaluate_model_understanding(model, val_dir: str | os.PathLike, max_images: int | None, batch_size: int = 8,
                                 beam_size: int = DEFAULT_BEAM, progress: bool = True,
                                 tasks: set[str] = frozenset({"vqa", "caption"}), caption_check: bool = True) -> dict:
    """VQA / caption metrics of a torch model, for the heads it has. caption_check: captions
    checked against the detector as served (for a model with checked phrases)."""
    from glipv2.predict import TorchUnderstanding
    from training.evaluate_understanding import evaluate_understanding

    u = TorchUnderstanding(model)
    answer_fn = u.vqa.answer if u.vqa and "vqa" in tasks else None
    caption_fn = None
    if u.captioner and "caption" in tasks:
        # Grounded captions, through the gateway's batch assembly: captions, then their
        # phrases grounded on the same images in one detector call per batch.
        from glipv2.image import letterbox
        from glipv2.postprocess import PostprocessConfig
        from glipv2.predict import TorchEngine
        from glipv2.runtime.batch import BatchRunner, CaptionBatchItem
        from glipv2.understanding import GROUNDING_SCORE_FLOOR

        cfg = model.cfg
        runner = BatchRunner(TorchEngine(model), u.captioner.tokenizer, cfg.image_hw, caption_tokens=cfg.caption_tokens,
                             caption_max_len=cfg.caption_max_len - 1, caption_end_id=cfg.caption_end_id,
                             caption_words=cfg.caption_words, caption_checked_phrases=cfg.caption_checked_phrases)
        ground = PostprocessConfig.for_model(cfg, score_threshold=GROUNDING_SCORE_FLOOR)
        check = PostprocessConfig.for_model(cfg, score_threshold=cfg.caption_check_threshold) if caption_check else None

        def caption_fn(images):
            boxed = [letterbox(im, cfg.image_hw) for im in images]
            return runner.run_caption_batch([CaptionBatchItem(px, beam_size, runner.caption_max_len, ground, lb, check)
                                             for px, lb in boxed])
    return evaluate_understanding(answer_fn, caption_fn, val_dir, max_images, batch_size, progress)


# --------------------------------------------------------------------------- CLI
_ALL_TASKS = "detection,vqa,caption"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate",
                                 description="Evaluate a checkpoint on a shapes-world val split.")
    ap.add_argument("--checkpoint", required=True, help="checkpoint file (.pt)")
    ap.add_argument("--data", required=True, help="val split directory (instances.json, grounding.json, images/)")
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=None, help="write the metrics as JSON here")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--beam-size", type=int, default=DEFAULT_BEAM,
                    help=f"caption beam size (default {DEFAULT_BEAM}, as served; 1 = greedy)")
    ap.add_argument("--no-caption-check", action="store_true",
                    help="decode captions without the detector check of the model's checked phrases "
                         "(ModelConfig.caption_checked_phrases; served with it)")
    ap.add_argument("--tasks", default=_ALL_TASKS,
                    help="comma-separated subset of detection, vqa, caption (those the model has)")
    args = ap.parse_args(argv)
    tasks = set(args.tasks.split(","))
    if not tasks <= {"detection", "vqa", "caption"}:
        ap.error("--tasks takes detection, vqa and caption")
    if args.max_images is not None and args.max_images < 1:
        ap.error("--max-images must be >= 1")
    if args.batch_size < 1:
        ap.error("--batch-size must be >= 1")

    from glipv2.checkpoint import CheckpointError, load_model

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    ckpt_path = Path(args.checkpoint)
    try:
        if not ckpt_path.is_file():
            raise CheckpointError(f"checkpoint {ckpt_path} does not exist")
        _open_split(args.data)  # fail on a bad split before the (slower) model load
        model, _ = load_model(ckpt_path)
        heads = {"vqa": model.vqa_head is not None, "caption": model.caption_decoder is not None}
        lacking = sorted(t for t in tasks if not heads.get(t, True))
        if lacking and args.tasks != _ALL_TASKS:  # asked for by name: say why nothing runs
            flags = " ".join(f"--loss-{t} 1" for t in lacking)
            raise CheckpointError(f"{ckpt_path} has no {' or '.join(lacking)} head (trained without {flags}); "
                                  f"--tasks {','.join(sorted(set(tasks) - set(lacking)) or ['detection'])} "
                                  "evaluates what it has")
        for t in lacking:  # the default: evaluate what the checkpoint has, and say what it skips
            print(f"note: {ckpt_path} has no {t} head; {t} not evaluated", file=sys.stderr)
        from glipv2.predict import TorchPredictor

        metrics = {}
        if "detection" in tasks:
            predictor = TorchPredictor(model)
            metrics = evaluate_detection(predictor.predict, args.data, max_images=args.max_images,
                                         batch_size=args.batch_size, progress=not args.no_progress)
        metrics.update(evaluate_model_understanding(model, args.data, args.max_images, args.batch_size,
                                                    args.beam_size, not args.no_progress, tasks,
                                                    caption_check=not args.no_caption_check))
    except (CheckpointError, DatasetError) as e:
        return fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except FileNotFoundError as e:  # e.g. the tokenizer package is not installed
        return fail(str(e).splitlines()[0])

    print(format_table(metrics))
    if metrics.get("precision_recall"):
        print("\n" + format_precision_recall(metrics["precision_recall"]))
    if args.out:
        out = Path(args.out)
        record = {"checkpoint": str(ckpt_path), "data": str(args.data),
                  **{k: _nan_to_none(v) for k, v in metrics.items()}}
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, out)
        except OSError as e:
            return fail(f"cannot write {out}: {e}")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
