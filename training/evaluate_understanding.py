"""VQA and caption metrics on a shapes-world val split (vqa_questions.json,
vqa_annotations.json, captions.json, images/).

- `vqa_accuracy`: the VQA v2 formula averaged over questions, also per question kind
  (colour, count, exists, relation, extreme = colour of the largest / smallest object).
- `caption_bleu4`, `caption_cider`: corpus BLEU-4 and CIDEr-D of one caption per image
  against its reference captions (see training.text_metrics).
- `caption_shape_recall`, `caption_pair_recall`: the share of the images' distinct shapes,
  and of their distinct (colour, shape) pairs, that the captions name (from
  instances.json's categories and colours): what n-gram metrics do not show, whether the
  caption says the right colour of the right shape.
Evaluated images are the first `max_images` of captions.json's image list, and the
questions on those images.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from glipv2.boxes import box_iou
from glipv2.phrases import ends_on_phrase, repeated_mention
from glipv2.understanding import Answer, Caption, GroundedPhrase
from training.data import CaptionDataset, DatasetError, VqaDataset, load_json
from training.shapes_world import COLOURS, PLURALS, SHAPES
from training.text_metrics import bleu, caption_tokens, cider_d, vqa_accuracy

AnswerFn = Callable[[Sequence[np.ndarray], Sequence[str]], Sequence[Answer]]
CaptionFn = Callable[[Sequence[np.ndarray]], Sequence[Caption]]


def question_kind(question: str) -> str:
    q = question.lower()
    if q.startswith("how many"):
        return "count"
    if q.startswith("is there"):
        return "exists"
    if q.startswith("what shape is"):
        return "relation"
    if "largest" in q or "smallest" in q:
        return "extreme"
    return "colour" if q.startswith("what color") else "other"


def named_objects(caption: str) -> set[tuple[str | None, str]]:
    """(colour, shape) for "red circles"-like mentions and (None, shape) for every shape word."""
    words = caption_tokens(caption)
    out: set[tuple[str | None, str]] = set()
    for i, w in enumerate(words):
        shape = next((s for s in SHAPES if w in (s, PLURALS[s])), None)
        if shape is not None:
            out.add((None, shape))
            if i and words[i - 1] in COLOURS:
                out.add((words[i - 1], shape))
    return out


def caption_object_recall(predicted: dict[int, str], instances: dict) -> dict[str, float]:
    """Recall of the images' shapes and (colour, shape) pairs in their captions, the
    precision of the named pairs (named pairs that are in the image), and the share of
    captions that name a phrase twice or end inside a phrase (glipv2.phrases)."""
    names = {c["id"]: c["name"] for c in instances.get("categories", [])}
    truth: dict[int, set] = defaultdict(set)
    for a in instances.get("annotations", []):
        if a.get("image_id") in predicted and a.get("colour"):
            truth[a["image_id"]].add((a["colour"], names.get(a["category_id"])))
    shapes_hit = shapes_all = pairs_hit = pairs_all = named_all = named_right = 0
    for iid, objects in truth.items():
        named = named_objects(predicted[iid])
        shapes = {s for _, s in objects}
        shapes_hit += sum((None, s) in named for s in shapes)
        shapes_all += len(shapes)
        pairs_hit += len(objects & named)
        pairs_all += len(objects)
        pairs = {p for p in named if p[0] is not None}
        named_all += len(pairs)
        named_right += len(pairs & objects)
    n = max(1, len(predicted))
    return {"caption_shape_recall": shapes_hit / max(1, shapes_all), "caption_pair_recall": pairs_hit / max(1, pairs_all),
            "caption_pair_precision": named_right / max(1, named_all),
            "caption_repeats": sum(repeated_mention(c) for c in predicted.values()) / n,
            "caption_unfinished": sum(not ends_on_phrase(c) for c in predicted.values()) / n}


def _pair_of(phrase: str) -> tuple[str, str] | None:
    """("red", "square") for "red square" / "red squares"; None for other phrases."""
    words = caption_tokens(phrase)
    if len(words) < 2 or words[-2] not in COLOURS:
        return None
    shape = next((s for s in SHAPES if words[-1] in (s, PLURALS[s])), None)
    return (words[-2], shape) if shape else None


def grounded_caption_accuracy(grounded: dict[int, list[GroundedPhrase]], instances: dict) -> dict[str, float]:
    """Of the objects the captions name by colour and shape ("two red squares" names two),
    the share whose returned box has IoU >= 0.5 with a drawn object of that colour and
    shape (each drawn object matched once; a missing box is a miss)."""
    names = {c["id"]: c["name"] for c in instances.get("categories", [])}
    truth: dict[int, list[tuple[tuple[str, str], np.ndarray]]] = defaultdict(list)
    for a in instances.get("annotations", []):
        if a.get("image_id") in grounded and a.get("colour"):
            x, y, w, h = a["bbox"]
            truth[a["image_id"]].append(((a["colour"], names.get(a["category_id"])), np.array([x, y, x + w, y + h])))
    named = hit = 0
    for iid, phrases in grounded.items():
        used: set[int] = set()
        for ph in phrases:
            pair = _pair_of(ph.text)
            if pair is None:
                continue
            named += ph.count
            for box, _ in ph.boxes[: ph.count]:
                cands = [(float(box_iou(np.asarray(box)[None], gt[None])[0, 0]), k)
                         for k, (p, gt) in enumerate(truth[iid]) if p == pair and k not in used]
                best = max(cands, default=(0.0, -1))
                if best[0] >= 0.5:
                    used.add(best[1])
                    hit += 1
    return {"grounded_caption_iou50": hit / max(1, named), "grounded_caption_named": named}


def evaluate_understanding(answer_fn: AnswerFn | None, caption_fn: CaptionFn | None,
                           val_dir: str | os.PathLike, max_images: int | None = None,
                           batch_size: int = 8, progress: bool = True) -> dict:
    root = Path(val_dir)
    t0 = time.perf_counter()
    metrics: dict = {}
    if caption_fn is None and answer_fn is None:
        return metrics
    captions = CaptionDataset(root / "captions.json", root / "images")
    image_ids = captions.image_ids[: max_images or None]
    keep = set(image_ids)
    images: dict[int, np.ndarray] = {}

    def image(i: int, load) -> np.ndarray:
        if i not in images:
            images[i] = load()
        return images[i]

    if answer_fn is not None:
        vqa = VqaDataset(root / "vqa_questions.json", root / "vqa_annotations.json", root / "images")
        todo = [k for k, (_, _, iid) in enumerate(vqa.questions) if iid in keep]
        by_kind: dict[str, list[float]] = defaultdict(list)
        for start in tqdm(range(0, len(todo), batch_size), desc="vqa", unit="batch", disable=not progress):
            chunk = todo[start:start + batch_size]
            qs = [vqa.questions[k] for k in chunk]
            imgs = [image(iid, lambda k=k: vqa[k].image) for k, (_, _, iid) in zip(chunk, qs)]
            for k, (_, question, _), ans in zip(chunk, qs, answer_fn(imgs, [q for _, q, _ in qs])):
                by_kind[question_kind(question)].append(vqa_accuracy(ans.answer, vqa.answers[k]))
        every = [a for v in by_kind.values() for a in v]
        if not every:
            raise DatasetError(f"{root}: no questions on the evaluated images")
        metrics["vqa_accuracy"] = float(np.mean(every))
        metrics["num_questions"] = len(every)
        for kind in sorted(by_kind):
            metrics[f"vqa_accuracy/{kind}"] = float(np.mean(by_kind[kind]))
    if caption_fn is not None:
        index = {iid: k for k, iid in enumerate(captions.image_ids)}
        predicted: dict[int, str] = {}
        grounded: dict[int, list[GroundedPhrase]] = {}
        for start in tqdm(range(0, len(image_ids), batch_size), desc="captions", unit="batch", disable=not progress):
            chunk = image_ids[start:start + batch_size]
            imgs = [image(iid, lambda iid=iid: captions[index[iid]].image) for iid in chunk]
            for iid, cap in zip(chunk, caption_fn(imgs)):
                predicted[iid] = cap.text
                if cap.phrases is not None:
                    grounded[iid] = cap.phrases
        refs = {iid: captions.captions[iid] for iid in image_ids}
        metrics["caption_bleu4"] = bleu(predicted, refs)
        metrics["caption_cider"] = cider_d(predicted, refs)
        metrics["num_captioned"] = len(predicted)
        if (root / "instances.json").is_file():
            instances = load_json(root / "instances.json")
            metrics.update(caption_object_recall(predicted, instances))
            if grounded:
                metrics.update(grounded_caption_accuracy(grounded, instances))
    metrics["understanding_seconds"] = time.perf_counter() - t0
    return metrics
