"""Write a shapes-world split in the real dataset formats.

    python -m training.generate --out data/shapes/val --split val --num-images 500 --seed 1

Writes under --out: images/{id:06d}.jpg|png (mixed formats and JPEG qualities; the json
file_name is relative to images/, the COCO convention: loaders take image_dir=OUT/images),
instances.json (COCO detection; annotations also carry "colour"), grounding.json
(MDETR style with tokens_positive_eval and phrase_kinds), vqa_questions.json +
vqa_annotations.json (VQA v2), captions.json (COCO captions). Image i of a split is
drawn from np.random.default_rng([seed, i, SPLIT_TAG[split]]): train and val streams
never coincide (and differ from ShapesWorldDataset's [seed, i]), and a split is rebuilt
byte for byte from its seed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from training import shapes_world as sw
from training.augment import augment as augment_image
from training.augment import gaussian_blur as augment_blur
from training.augment import jpeg_reencode as augment_jpeg
from training.data import join_phrases

# Non-zero tags, last in the entropy list: numpy's SeedSequence treats trailing zeros as
# absent, so [seed, i, 0] would equal ShapesWorldDataset's [seed, i].
SPLIT_TAG = {"train": 101, "val": 202}
CATEGORY_IDS = {s: k + 1 for k, s in enumerate(sw.SHAPES)}
N_CAPTIONS = 5


def _xywh(box: tuple[float, ...]) -> list[float]:
    x0, y0, x1, y1 = box
    return [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]


def _answer_type(answer: str) -> str:
    return "yes/no" if answer in ("yes", "no") else "number" if answer.isdigit() else "other"


def _question_type(question: str) -> str:
    # VQA v2 question types are the question's leading words
    for prefix in ("what color is the", "how many", "is there a", "what shape is"):
        if question.startswith(prefix):
            return prefix
    return "other"


def _save_image(image: np.ndarray, path_stem: Path, rng: np.random.Generator) -> str:
    if rng.random() < 0.3:
        name = path_stem.with_suffix(".png")
        Image.fromarray(image).save(name, optimize=False)
    else:
        name = path_stem.with_suffix(".jpg")
        Image.fromarray(image).save(name, quality=int(rng.integers(70, 96)))
    return name.name


def _extreme(scene: sw.Scene, k: int, rng: np.random.Generator) -> np.ndarray:
    """Image k drawn at the rendering settings' extremes: the background kinds in turn
    (noise at its largest amplitude), aliased and 4x antialiased by turns, every object
    with its dark edge on odd images, then the strongest blur and the lowest JPEG quality
    of the training augmentation (training.augment)."""
    bg = scene.background
    kind = ("flat", "gradient", "noise")[k % 3]
    scene.background = sw.Background(kind, bg.colour, bg.colour2 or bg.colour, bg.angle, amplitude=14.0)
    pixels = sw.render(scene, rng, antialias=1 if k % 2 else 4, edges=bool(k % 2))
    return augment_jpeg(augment_blur(pixels, 1.2), 30)


def generate(out: str | os.PathLike, split: str = "val", num_images: int = 500, seed: int = 1,
             augment: bool = False, progress: bool = True, extreme: bool = False) -> Path:
    """Generate a split under `out` (see module doc); returns the output directory.
    `augment` applies training-style photometric augmentation to the stored images;
    `extreme` draws every image at the rendering settings' extremes (see _extreme)."""
    if split not in SPLIT_TAG:
        raise ValueError(f"split must be one of {sorted(SPLIT_TAG)}, got {split!r}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i, "name": s, "supercategory": "shape"} for s, i in CATEGORY_IDS.items()]
    info = {"description": f"shapes world, split {split}, seed {seed}", "version": "1.0"}
    images, instances, g_images, g_anns = [], [], [], []
    questions, q_anns, cap_anns = [], [], []
    for k in tqdm(range(num_images), desc=f"shapes {split}", disable=not progress):
        rng = np.random.default_rng([seed, k, SPLIT_TAG[split]])
        image_id = k + 1
        scene = sw.sample_scene(rng)
        pixels = _extreme(scene, k, rng) if extreme else sw.render(scene, rng)
        if augment:
            pixels = augment_image(pixels, rng)
        file_name = _save_image(pixels, out / "images" / f"{image_id:06d}", rng)
        image_entry = {"id": image_id, "file_name": file_name,
                       "width": scene.width, "height": scene.height}
        images.append(image_entry)
        # one annotation record per object, reused by detection and grounding
        records = []
        for o in scene.objects:
            poly = sw.shape_polygon(o)
            records.append({"category_id": CATEGORY_IDS[o.shape], "bbox": _xywh(o.box),
                            "area": round(sw.polygon_area(poly), 2), "iscrowd": 0,
                            "segmentation": [[round(float(v), 2) for v in poly.reshape(-1)]],
                            "colour": o.colour})
        for r in records:
            instances.append({"id": len(instances) + 1, "image_id": image_id, **r})

        phrases = sw.grounding_phrases(scene, rng)
        caption, spans = join_phrases([p.text for p in phrases])
        g_id = len(g_images) + 1
        g_images.append({"id": g_id, "original_img_id": image_id, "file_name": file_name,
                         "width": scene.width, "height": scene.height, "caption": caption,
                         "dataset_name": "shapes",
                         "tokens_positive_eval": [[list(s) for s in sp] for sp in spans],
                         "phrase_kinds": [p.kind for p in phrases]})
        for p, sp in zip(phrases, spans):
            for i in p.objects:
                g_anns.append({"id": len(g_anns) + 1, "image_id": g_id, **records[i],
                               "tokens_positive": [list(s) for s in sp]})

        for q, a in sw.vqa_pairs(scene, rng):
            qid = len(questions) + 1
            questions.append({"image_id": image_id, "question": q, "question_id": qid})
            q_anns.append({"question_id": qid, "image_id": image_id,
                           "question_type": _question_type(q), "answer_type": _answer_type(a),
                           "multiple_choice_answer": a,
                           "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                       for j in range(10)]})
        for c in sw.captions(scene, rng, N_CAPTIONS):
            cap_anns.append({"image_id": image_id, "id": len(cap_anns) + 1, "caption": c})

    image_list = [{"id": im["id"], "file_name": im["file_name"]} for im in images]
    files = {
        "instances.json": {"info": info, "images": images, "annotations": instances,
                           "categories": categories},
        "grounding.json": {"info": info, "images": g_images, "annotations": g_anns,
                           "categories": categories},
        # VQA v2 keys plus an "images" list: VQA files do not name image files otherwise
        "vqa_questions.json": {"info": info, "task_type": "Open-Ended", "data_type": "shapes",
                               "data_subtype": split, "questions": questions, "images": image_list},
        "vqa_annotations.json": {"info": info, "data_type": "shapes", "data_subtype": split,
                                 "annotations": q_anns},
        "captions.json": {"info": info, "images": images, "annotations": cap_anns},
    }
    for name, obj in files.items():
        with open(out / name, "w", encoding="utf-8") as f:
            json.dump(obj, f)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--split", choices=sorted(SPLIT_TAG), default="val")
    ap.add_argument("--num-images", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--augment", action="store_true",
                    help="apply photometric augmentation (blur, noise, JPEG) to stored images")
    ap.add_argument("--extreme", action="store_true",
                    help="draw every image at the rendering extremes (background kinds in turn, aliased / 4x "
                    "antialiased, edges, strongest blur, JPEG quality 30)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    out = generate(args.out, args.split, args.num_images, args.seed, args.augment,
                   progress=not args.no_progress, extreme=args.extreme)
    print(f"wrote {args.num_images} {args.split} images to {out}")


if __name__ == "__main__":
    main()
