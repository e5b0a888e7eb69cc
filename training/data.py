"""Training/evaluation samples and dataset loaders.

Everything a grounding model trains on is a `GroundingSample`: an image, a prompt, the
character spans of the prompt's phrases (tokens_positive style) and boxes linked to
phrases. Sources: the on-the-fly shapes world, COCO detection json, MDETR/GoldG-style
grounding json; VQA v2 and COCO captions have their own small sample types.

Loaders read and validate the json up front (so a bad file fails at construction, with
the file named) and read images lazily in __getitem__ (PIL, EXIF orientation applied,
RGB). Every problem is a `DatasetError`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from training import shapes_world as sw
from training.augment import augment as augment_image

Span = tuple[int, int]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset file is missing, malformed or inconsistent (the message names it)."""


@dataclass
class GroundingSample:
    image: np.ndarray                          # uint8 HxWx3 RGB, original size
    caption: str                               # the prompt text, e.g. "red circle. star."
    phrase_spans: list[list[Span]]             # per phrase: [start, end) spans in caption
    boxes: np.ndarray                          # float32 [N, 4] xyxy pixels
    box_phrase: np.ndarray                     # int64 [N]: phrase index of each box
    image_id: int
    phrase_kinds: list[str] | None = None      # "shape" | "colour" | "size" | "relation" | "plural"
    # Understanding tasks on the same image (multi-task training), when the source has them.
    question: str | None = None
    answers: list[str] | None = None           # annotator answers (VQA v2 has 10)
    captions: list[str] | None = None          # reference captions; training picks one
    # The object that answers the question ("leftmost", ..., glipv2.modeling.vqa.EXTREMES)
    # when the source knows one always does: the VQA extremes' gate target.
    question_extreme: str | None = None
    # Every object in the image (float32 [M, 4] xyxy pixels) when the source knows them all:
    # the VQA head's objectness targets (the prompt's boxes may name only some objects).
    objects: np.ndarray | None = None


@dataclass
class VqaSample:
    image: np.ndarray
    question: str
    answers: list[str]                         # the raw annotator answers (10 in VQA v2)
    question_id: int
    image_id: int


@dataclass
class CaptionSample:
    image: np.ndarray
    captions: list[str]
    image_id: int


# --------------------------------------------------------------------------- helpers
def join_phrases(phrases: list[str]) -> tuple[str, list[list[Span]]]:
    """["red circle", "star"] -> ("red circle. star.", [[(0, 10)], [(12, 16)]])."""
    caption, spans = "", []
    for i, p in enumerate(phrases):
        if i:
            caption += ". "
        spans.append([(len(caption), len(caption) + len(p))])
        caption += p
    return caption + ("." if phrases else ""), spans


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: invalid JSON ({e})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from e


def load_image(path: str | os.PathLike) -> np.ndarray:
    """uint8 HxWx3 RGB with EXIF orientation applied (phone photos are often stored
    sideways with an orientation tag; boxes refer to the upright image)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable image ({e})") from e


def _get(obj: Any, key: str, path: Path, where: str, types: type | tuple = object) -> Any:
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: {where} should be a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise DatasetError(f"{path}: {where} is missing required key {key!r}")
    value = obj[key]
    if not isinstance(value, types) or isinstance(value, bool) and types is not bool:
        raise DatasetError(f"{path}: {where}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def _bbox_xyxy(bbox: Any, path: Path, where: str) -> tuple[float, float, float, float] | None:
    """COCO xywh -> xyxy; None for a zero-size box (dropped, as COCO tools do)."""
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
        raise DatasetError(f"{path}: {where}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        raise DatasetError(f"{path}: {where}: bbox has negative size {bbox!r}")
    if w == 0 or h == 0:
        return None
    return x, y, x + w, y + h


def _spans(value: Any, caption: str, path: Path, where: str) -> list[Span]:
    if not isinstance(value, list):
        raise DatasetError(f"{path}: {where}: spans must be a list of [start, end], got {value!r}")
    out = []
    for s in value:
        if not (isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(v, int) for v in s)):
            raise DatasetError(f"{path}: {where}: span must be [start, end] ints, got {s!r}")
        a, b = s
        if not 0 <= a < b <= len(caption):
            raise DatasetError(f"{path}: {where}: span {[a, b]} lies outside the caption "
                               f"(length {len(caption)}): {caption!r}")
        out.append((a, b))
    return sorted(out)


def _image_table(images: Any, path: Path) -> dict[int, str]:
    if not isinstance(images, list):
        raise DatasetError(f"{path}: 'images' should be a list")
    table: dict[int, str] = {}
    for k, im in enumerate(images):
        where = f"images[{k}]"
        iid = _get(im, "id", path, where, int)
        if iid in table:
            raise DatasetError(f"{path}: {where}: duplicate image id {iid}")
        table[iid] = _get(im, "file_name", path, where, str)
    return table


def _empty_boxes() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)


# --------------------------------------------------------------------------- shapes world
def scene_sample(scene: sw.Scene, image: np.ndarray, rng: np.random.Generator,
                 grounding: bool, image_id: int, extra: Sequence[sw.Phrase] = ()) -> GroundingSample:
    """A GroundingSample from a scene: grounding phrases (each phrase's objects; an object
    named by several phrases gets one box per phrase), with `extra` phrases put at random
    places among them, or a detection prompt (each object linked to its shape's phrase)."""
    boxes: list[tuple[float, ...]] = []
    links: list[int] = []
    if grounding:
        phrases = sw.grounding_phrases(scene, rng)
        for p in extra:
            if all(p.text != q.text for q in phrases):  # a relation drawn twice is named once
                phrases.insert(int(rng.integers(len(phrases) + 1)), p)
        texts, kinds = [p.text for p in phrases], [p.kind for p in phrases]
        for j, p in enumerate(phrases):
            for i in p.objects:
                boxes.append(scene.objects[i].box)
                links.append(j)
    else:
        texts = sw.detection_phrases(scene, rng)
        kinds = ["shape"] * len(texts)
        for o in scene.objects:
            boxes.append(o.box)
            links.append(texts.index(o.shape))
    caption, spans = join_phrases(texts)
    b, l = _empty_boxes() if not boxes else (np.array(boxes, np.float32), np.array(links, np.int64))
    objects = np.array([o.box for o in scene.objects], np.float32).reshape(-1, 4)
    return GroundingSample(image, caption, spans, b, l, image_id, kinds, objects=objects)


class ShapesWorldDataset:
    """Shapes-world samples drawn on the fly; sample i is a pure function of (seed, i),
    so training can resume at any position and workers need no shared state."""

    def __init__(self, seed: int, length: int, grounding_fraction: float = 0.5,
                 augment: bool = True, understanding: bool = False, plurals: float = 0.0,
                 relations: float = 0.0) -> None:
        """plurals: the share of grounding samples that also name shapes in the plural
        (shapes_world.plural_phrases), the words count questions use; relations: the share
        that get EXTRA_RELATIONS more relation phrases (training only: the val splits keep
        shapes_world.grounding_phrases as it is)."""
        if length < 0 or not all(0 <= v <= 1 for v in (grounding_fraction, plurals, relations)):
            raise ValueError("length must be >= 0, grounding_fraction, plurals and relations in [0, 1]")
        self.seed, self.length = int(seed), int(length)
        self.grounding_fraction, self.augment = grounding_fraction, augment
        self.understanding, self.plurals, self.relations = understanding, plurals, relations

    def __len__(self) -> int:
        return self.length

    def scene(self, i: int) -> tuple[sw.Scene, np.random.Generator]:
        """The scene of sample i and the generator positioned right after sampling it."""
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} samples")
        rng = np.random.default_rng([self.seed, i])
        return sw.sample_scene(rng), rng

    def __getitem__(self, i: int) -> GroundingSample:
        scene, rng = self.scene(i)
        image = sw.render(scene, rng)
        if self.augment:
            image = augment_image(image, rng)
        grounding = bool(rng.random() < self.grounding_fraction)
        extra: list[sw.Phrase] = []
        if grounding:
            for share, salt, make in ((self.plurals, 13, sw.plural_phrases), (self.relations, 17, _extra_relations)):
                if share <= 0:
                    continue  # nothing drawn: every sample is what it was before
                # A generator of their own per kind: the sample's other phrases stay as they were.
                extra_rng = np.random.default_rng([self.seed, i % self.length, salt])
                if extra_rng.random() < share:
                    extra += make(scene, extra_rng)
        sample = scene_sample(scene, image, rng, grounding, i % self.length, extra)
        if self.understanding:
            sample.question, answer, sample.captions = understanding_targets(scene, self.seed, i % self.length)
            sample.answers = [answer] * 10  # VQA v2 style: ten agreeing annotators
            sample.question_extreme = sw.question_extreme(sample.question)
        return sample


# Relation phrases are about 1 in 15 of the grounding phrases (0-2 per sample, where the
# relation is clear); their misses box the anchor object ("the yellow square left of the
# green hexagon" -> the green hexagon), which only more relation phrases teach against.
EXTRA_RELATIONS = 2


def _extra_relations(scene: sw.Scene, rng: np.random.Generator) -> list[sw.Phrase]:
    return sw.relation_phrases(scene, rng, EXTRA_RELATIONS)


def understanding_targets(scene: sw.Scene, seed: int, i: int) -> tuple[str, str, list[str]]:
    """One question with its answer and the reference captions of scene i.

    A generator of their own (not the rendering one), so vocabularies can be built from
    scenes alone, without drawing images."""
    rng = np.random.default_rng([seed, i, 7])
    pairs = sw.vqa_pairs(scene, rng)
    question, answer = pairs[int(rng.integers(len(pairs)))]
    return question, answer, sw.captions(scene, rng)


# --------------------------------------------------------------------------- COCO detection
class CocoDetectionDataset:
    """COCO instances json -> GroundingSample per image. The prompt is the category names
    joined ("person. bicycle. car."); each box is linked to its category's phrase.
    prompt="sampled": the present categories plus a random subset of absent ones, shuffled,
    deterministic per (seed, index), at most `max_phrases` phrases. Crowd and zero-size
    boxes are dropped."""

    def __init__(self, annotation_json: str | os.PathLike, image_dir: str | os.PathLike,
                 prompt: str = "all", seed: int = 0, max_phrases: int = 40) -> None:
        if prompt not in ("all", "sampled"):
            raise ValueError(f"prompt must be 'all' or 'sampled', got {prompt!r}")
        path = Path(annotation_json)
        data = load_json(path)
        self.path, self.image_dir = path, Path(image_dir)
        self.prompt, self.seed, self.max_phrases = prompt, seed, max_phrases
        files = _image_table(_get(data, "images", path, "top level", list), path)
        cats = _get(data, "categories", path, "top level", list)
        self.categories: dict[int, str] = {}
        for k, c in enumerate(cats):
            self.categories[_get(c, "id", path, f"categories[{k}]", int)] = \
                _get(c, "name", path, f"categories[{k}]", str)
        self.category_ids = sorted(self.categories)
        self.image_ids = list(files)
        self.files = files
        self.anns: dict[int, list[tuple[tuple[float, ...], int]]] = {i: [] for i in files}
        for k, a in enumerate(_get(data, "annotations", path, "top level", list)):
            where = f"annotations[{k}]"
            iid = _get(a, "image_id", path, where, int)
            if iid not in files:
                raise DatasetError(f"{path}: {where} refers to unknown image id {iid}")
            cid = _get(a, "category_id", path, where, int)
            if cid not in self.categories:
                raise DatasetError(f"{path}: {where} refers to unknown category id {cid}")
            box = _bbox_xyxy(_get(a, "bbox", path, where), path, where)
            if box is not None and not a.get("iscrowd", 0):
                self.anns[iid].append((box, cid))

    def __len__(self) -> int:
        return len(self.image_ids)

    def prompt_category_ids(self, i: int) -> list[int]:
        """The category id of each phrase of sample i's prompt, in prompt order."""
        if self.prompt == "all":
            return list(self.category_ids)
        rng = np.random.default_rng([self.seed, i])
        present = sorted({c for _, c in self.anns[self.image_ids[i]]})
        absent = [c for c in self.category_ids if c not in present]
        room = max(self.max_phrases - len(present), 0)
        k = int(rng.integers(0, min(room, len(absent)) + 1))
        chosen = present + [absent[j] for j in rng.permutation(len(absent))[:k]]
        return [chosen[j] for j in rng.permutation(len(chosen))]

    def __getitem__(self, i: int) -> GroundingSample:
        iid = self.image_ids[i]
        image = load_image(self.image_dir / self.files[iid])
        cids = self.prompt_category_ids(i)
        caption, spans = join_phrases([self.categories[c] for c in cids])
        index = {c: j for j, c in enumerate(cids)}
        anns = self.anns[iid]
        if not anns:
            boxes, links = _empty_boxes()
        else:
            boxes = np.array([b for b, _ in anns], np.float32)
            links = np.array([index[c] for _, c in anns], np.int64)
        return GroundingSample(image, caption, spans, boxes, links, iid)


# --------------------------------------------------------------------------- grounding
class GroundingDataset:
    """MDETR / GoldG-style grounding json (Flickr30k entities, mixed GoldG, and the
    shapes-world generator's grounding.json): one sample per `images` entry (an image +
    caption). Phrases are the entry's `tokens_positive_eval` when present (this keeps
    phrases that denote nothing), else the distinct `tokens_positive` of its annotations.
    An annotation whose spans match no listed phrase goes to the phrase it overlaps
    most, or becomes a phrase of its own. Unknown keys are ignored."""

    def __init__(self, annotation_json: str | os.PathLike, image_dir: str | os.PathLike) -> None:
        path = Path(annotation_json)
        data = load_json(path)
        self.path, self.image_dir = path, Path(image_dir)
        entries = _get(data, "images", path, "top level", list)
        self.entries: list[dict[str, Any]] = []
        by_id: dict[int, dict[str, Any]] = {}
        for k, e in enumerate(entries):
            where = f"images[{k}]"
            iid = _get(e, "id", path, where, int)
            if iid in by_id:
                raise DatasetError(f"{path}: {where}: duplicate image id {iid}")
            caption = _get(e, "caption", path, where, str)
            rec: dict[str, Any] = {"id": iid, "file_name": _get(e, "file_name", path, where, str),
                                   "caption": caption, "phrases": None, "kinds": None, "anns": []}
            if e.get("tokens_positive_eval") is not None:
                tpe = _get(e, "tokens_positive_eval", path, where, list)
                rec["phrases"] = [_spans(p, caption, path, f"{where} tokens_positive_eval[{j}]")
                                  for j, p in enumerate(tpe)]
                kinds = e.get("phrase_kinds")
                if kinds is not None:
                    if not (isinstance(kinds, list) and len(kinds) == len(tpe)):
                        raise DatasetError(f"{path}: {where}: phrase_kinds must be a list aligned "
                                           f"with tokens_positive_eval ({len(tpe)} phrases)")
                    rec["kinds"] = [str(x) for x in kinds]
            by_id[iid] = rec
            self.entries.append(rec)
        for k, a in enumerate(_get(data, "annotations", path, "top level", list)):
            where = f"annotations[{k}]"
            iid = _get(a, "image_id", path, where, int)
            if iid not in by_id:
                raise DatasetError(f"{path}: {where} refers to unknown image id {iid}")
            rec = by_id[iid]
            spans = _spans(_get(a, "tokens_positive", path, where), rec["caption"], path, where)
            box = _bbox_xyxy(_get(a, "bbox", path, where), path, where)
            if box is not None and spans and not a.get("iscrowd", 0):
                rec["anns"].append((box, spans))

    def __len__(self) -> int:
        return len(self.entries)

    @staticmethod
    def _link(rec: dict[str, Any]) -> tuple[list[list[Span]], list[str] | None, list[int]]:
        phrases = [list(p) for p in rec["phrases"]] if rec["phrases"] is not None else []
        kinds = list(rec["kinds"]) if rec["kinds"] is not None else None
        if rec["phrases"] is None:  # phrases = distinct annotation spans, in caption order
            for spans in sorted({tuple(s) for _, s in rec["anns"]}):
                phrases.append(list(spans))
        links = []
        for _, spans in rec["anns"]:
            if spans in phrases:
                links.append(phrases.index(spans))
                continue
            overlap = [sum(max(0, min(b, d) - max(a, c)) for a, b in spans for c, d in p)
                       for p in phrases]
            if overlap and max(overlap) > 0:
                links.append(int(np.argmax(overlap)))
            else:
                phrases.append(list(spans))
                if kinds is not None:
                    kinds.append("other")
                links.append(len(phrases) - 1)
        return phrases, kinds, links

    def __getitem__(self, i: int) -> GroundingSample:
        rec = self.entries[i]
        image = load_image(self.image_dir / rec["file_name"])
        phrases, kinds, links = self._link(rec)
        if rec["anns"]:
            boxes = np.array([b for b, _ in rec["anns"]], np.float32)
            box_phrase = np.array(links, np.int64)
        else:
            boxes, box_phrase = _empty_boxes()
        return GroundingSample(image, rec["caption"], phrases, boxes, box_phrase, rec["id"], kinds)


# --------------------------------------------------------------------------- VQA v2
def _scan_image_dir(image_dir: Path, path: Path) -> dict[int, str]:
    """image id -> file name, from names like COCO_val2014_000000000042.jpg, 000042.png."""
    if not image_dir.is_dir():
        raise DatasetError(f"{path}: image directory {image_dir} not found")
    table: dict[int, str] = {}
    for name in os.listdir(image_dir):
        stem, ext = os.path.splitext(name)
        tail = stem.rsplit("_", 1)[-1]
        if ext.lower() in IMAGE_EXTENSIONS and tail.isdigit():
            table.setdefault(int(tail), name)
    return table


class VqaDataset:
    """VQA v2 questions (+ annotations) json -> VqaSample per question.

    VQA v2 files do not name image files: they are taken from an `images` list
    ([{id, file_name}], written by the shapes-world generator) when the questions file has
    one, else found in image_dir by the number ending the file name (COCO_val2014_…42.jpg).
    `annotations_json=None` (test split) gives samples with empty answers."""

    def __init__(self, questions_json: str | os.PathLike, annotations_json: str | os.PathLike | None,
                 image_dir: str | os.PathLike) -> None:
        qpath = Path(questions_json)
        data = load_json(qpath)
        self.image_dir = Path(image_dir)
        questions = _get(data, "questions", qpath, "top level", list)
        if "images" in data:
            files = _image_table(data["images"], qpath)
        else:
            files = _scan_image_dir(self.image_dir, qpath)
        self.files = files
        self.questions: list[tuple[int, str, int]] = []
        index: dict[int, int] = {}
        for k, q in enumerate(questions):
            where = f"questions[{k}]"
            qid = _get(q, "question_id", qpath, where, int)
            iid = _get(q, "image_id", qpath, where, int)
            if iid not in files:
                raise DatasetError(f"{qpath}: {where} refers to unknown image id {iid} "
                                   f"(no such entry in 'images' / file in {self.image_dir})")
            if qid in index:
                raise DatasetError(f"{qpath}: {where}: duplicate question id {qid}")
            index[qid] = len(self.questions)
            self.questions.append((qid, _get(q, "question", qpath, where, str), iid))
        self.answers: list[list[str]] = [[] for _ in self.questions]
        if annotations_json is None:
            return
        apath = Path(annotations_json)
        adata = load_json(apath)
        seen = set()
        for k, a in enumerate(_get(adata, "annotations", apath, "top level", list)):
            where = f"annotations[{k}]"
            qid = _get(a, "question_id", apath, where, int)
            if qid not in index:
                raise DatasetError(f"{apath}: {where} refers to unknown question id {qid}")
            iid = _get(a, "image_id", apath, where, int)
            if iid != self.questions[index[qid]][2]:
                raise DatasetError(f"{apath}: {where}: image id {iid} differs from question "
                                   f"{qid}'s image id {self.questions[index[qid]][2]}")
            answers = _get(a, "answers", apath, where, list)
            self.answers[index[qid]] = [
                str(_get(x, "answer", apath, f"{where} answers[{j}]")) for j, x in enumerate(answers)]
            seen.add(qid)
        missing = [qid for qid in index if qid not in seen]
        if missing:
            raise DatasetError(f"{apath}: no annotation for {len(missing)} question(s), "
                               f"e.g. question id {missing[0]}")

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i: int) -> VqaSample:
        qid, question, iid = self.questions[i]
        image = load_image(self.image_dir / self.files[iid])
        return VqaSample(image, question, list(self.answers[i]), qid, iid)


# --------------------------------------------------------------------------- captions
class CaptionDataset:
    """COCO captions json -> CaptionSample per image (all its reference captions)."""

    def __init__(self, captions_json: str | os.PathLike, image_dir: str | os.PathLike) -> None:
        path = Path(captions_json)
        data = load_json(path)
        self.image_dir = Path(image_dir)
        self.files = _image_table(_get(data, "images", path, "top level", list), path)
        self.image_ids = list(self.files)
        self.captions: dict[int, list[str]] = {i: [] for i in self.files}
        for k, a in enumerate(_get(data, "annotations", path, "top level", list)):
            where = f"annotations[{k}]"
            iid = _get(a, "image_id", path, where, int)
            if iid not in self.files:
                raise DatasetError(f"{path}: {where} refers to unknown image id {iid}")
            self.captions[iid].append(_get(a, "caption", path, where, str))

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> CaptionSample:
        iid = self.image_ids[i]
        image = load_image(self.image_dir / self.files[iid])
        return CaptionSample(image, list(self.captions[iid]), iid)
