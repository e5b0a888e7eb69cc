"""Parity: the exported ONNX graphs against the PyTorch model they came from.

`python -m export.verify --checkpoint demo/tiny.pt` exports (or takes --onnx-dir), then
1. runs both on the same inputs at batch sizes and prompt lengths other than the export's
   and reports the max abs difference of every output (logits must be within 1e-3), and
2. runs the full pipeline (letterbox, tokenize, the gateway's batch assembly
   glipv2.runtime.batch.BatchRunner, top-K, numpy postprocess) with each engine
   on shapes val images and checks the detections are the same;
3. for a model with a VQA head / caption decoder: answer logits and caption step
   log-probabilities (within 1e-3), and the same answers and the same captions (greedy
   and beam 3) from both engines.
Exit status 0 when both hold, 1 when not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from export.onnx_export import export_onnx
from glipv2.checkpoint import CheckpointError, load_model
from glipv2.modeling.glipv2 import GLIPv2
from glipv2.postprocess import Detections, PostprocessConfig
from glipv2.predict import TorchPredictor
from glipv2.runtime.graphs import model_file
from glipv2.runtime.onnx import OrtEngine
from glipv2.runtime.pipeline import DetectionPipeline, VqaPipeline
from glipv2.text import Tokenizer, build_prompt, encode_question, pad_batch, pad_ids, tokenize

LOGIT_TOLERANCE = 1e-3
PROMPTS = ["circle. square. triangle. star. hexagon. cross.", "red circle. blue star. large hexagon.", "green cross"]


@dataclass
class ParityReport:
    max_abs: dict[str, float] = field(default_factory=dict)  # per output, over all checked batches
    images: int = 0
    detections: int = 0
    detection_mismatches: list[str] = field(default_factory=list)

    answers: int = 0
    answer_mismatches: list[str] = field(default_factory=list)
    captions: int = 0
    caption_mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        close = all(self.max_abs.get(k, 0.0) <= LOGIT_TOLERANCE for k in ("answer_logits", "caption_logprobs"))
        return (self.max_abs.get("logits", np.inf) <= LOGIT_TOLERANCE and close and not self.detection_mismatches
                and not self.answer_mismatches and not self.caption_mismatches)


def _raw_inputs(model: GLIPv2, tokenizer: Tokenizer, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    h, w = model.cfg.image_hw
    images = rng.integers(0, 256, (batch, 3, h, w), dtype=np.uint8)
    prompts = [build_prompt(PROMPTS[(seed + i) % len(PROMPTS)]) for i in range(batch)]
    tb = pad_batch([tokenize(tokenizer, p) for p in prompts], buckets=None)
    return images, tb.input_ids, tb.attention_mask


def compare_outputs(model: GLIPv2, engine: OrtEngine, top_k: int, tokenizer: Tokenizer, report: ParityReport) -> None:
    """Raw outputs at batch 1 and 3 (the export used 2), prompts of mixed lengths; the top-K
    rows of each image matched as sets (see _nearest_rows)."""
    def note(name: str, a: np.ndarray, b: np.ndarray) -> None:
        report.max_abs[name] = max(report.max_abs.get(name, 0.0), float(np.abs(a - b).max()))

    with torch.no_grad():
        for batch, seed in ((1, 0), (3, 1)):
            images, ids, mask = _raw_inputs(model, tokenizer, batch, seed)
            ref_text = model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
            text = engine.encode_text(ids, mask)
            real = mask.astype(bool)
            note("token_features", text[real], ref_text[real])
            out = model.detect(torch.from_numpy(images), torch.from_numpy(ref_text), torch.from_numpy(mask))
            ref = [t.numpy() for t in model.top_k(out, torch.from_numpy(mask), top_k)]
            got = engine.detect(images, ref_text, mask)
            image = np.arange(batch)[:, None]
            got_to_ref, ref_to_got = _nearest_rows(got, ref), _nearest_rows(ref, got)
            for name, a, b in zip(("boxes", "logits", "centerness"), got, ref):
                note(name, a, b[image, got_to_ref])
                note(name, a[image, ref_to_got], b)


def _nearest_rows(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> np.ndarray:
    """[batch, K]: for each top-K row of `a` (boxes, logits, centerness together), the row of
    `b` of the same image closest to it. Top-K orders the anchors by score, and anchors whose
    scores tie within float error come out in either order from either runtime (seen:
    ranks 98 and 99 of an image swapped between PyTorch and ONNX Runtime), so the rows are
    compared with their nearest counterparts, in both directions: any real difference
    still shows as a distance."""
    def rows(outputs):
        return np.concatenate([o.reshape(o.shape[0], o.shape[1], -1) for o in outputs], axis=2)

    ra, rb = rows(a), rows(b)
    return np.abs(ra[:, :, None, :] - rb[:, None, :, :]).max(axis=3).argmin(axis=2)


QUESTIONS = ["what color is the star?", "how many circles are there?", "is there a red square?",
             "what shape is left of the blue circle?", "what color is the largest object?"]


def compare_understanding(model: GLIPv2, engine: OrtEngine, images: list[np.ndarray], tokenizer: Tokenizer,
                          report: ParityReport) -> None:
    """VQA logits and caption log-probabilities, then answers and captions end to end."""
    from glipv2.predict import TorchUnderstanding
    from glipv2.understanding import CaptionPipeline

    def note(name: str, a: np.ndarray, b: np.ndarray) -> None:
        report.max_abs[name] = max(report.max_abs.get(name, 0.0), float(np.abs(a - b).max()))

    cfg = model.cfg
    ours = TorchUnderstanding(model, tokenizer)
    if ours.vqa is not None:
        theirs = VqaPipeline(engine, cfg.image_hw, cfg.vqa_answers, tokenizer)
        for batch, seed in ((1, 0), (3, 1)):
            pixels = np.random.default_rng(seed).integers(0, 256, (batch, 3, *cfg.image_hw), dtype=np.uint8)
            ids, mask = pad_ids([encode_question(tokenizer, QUESTIONS[(seed + i) % len(QUESTIONS)])
                                 for i in range(batch)], pad_id=tokenizer.pad_id)
            features = ours.vqa.engine.encode_text(ids, mask)  # the same (torch) features into both graphs
            note("answer_logits", engine.vqa(pixels, features, mask), ours.vqa.engine.vqa(pixels, features, mask))
        for q in QUESTIONS:
            for i, (a, b) in enumerate(zip(ours.vqa.answer(images, [q] * len(images)),
                                           theirs.answer(images, [q] * len(images)))):
                report.answers += 1
                if a.answer != b.answer or abs(a.score - b.score) > 1e-4:
                    report.answer_mismatches.append(f"image {i}, {q!r}: {a.answer} ({a.score:.4f}) vs "
                                                    f"{b.answer} ({b.score:.4f})")
    if ours.captioner is not None:
        if engine.captioner is None:
            report.caption_mismatches.append("the export has no caption graphs")
            return
        pixels = np.random.default_rng(2).integers(0, 256, (3, 3, *cfg.image_hw), dtype=np.uint8)
        a, b = ours.captioner.engine.start(pixels), engine.captioner.start(pixels)
        note("caption_logprobs", a[0], b[0])
        tokens = np.argmax(a[0], axis=1)
        for _ in range(3):  # a few steps on the same (torch) caches
            a2 = ours.captioner.engine.step(tokens, *a[1:3], *a[3:5])
            b2 = engine.captioner.step(tokens, *a[1:3], *a[3:5])
            note("caption_logprobs", a2[0], b2[0])
            a = (a2[0], a2[1], a2[2], a[3], a[4])
            tokens = np.argmax(a2[0], axis=1)
        theirs_cap = CaptionPipeline(engine.captioner, cfg.image_hw, cfg.caption_tokens, cfg.caption_max_len,
                                     cfg.caption_end_id, tokenizer, cfg.caption_words)
        for beam in (1, 3):
            for i, (x, y) in enumerate(zip(ours.captioner.caption(images, beam), theirs_cap.caption(images, beam))):
                report.captions += 1
                if x.text != y.text:
                    report.caption_mismatches.append(f"image {i}, beam {beam}: {x.text!r} vs {y.text!r}")


def same_detections(a: Detections, b: Detections, score_tol: float = 1e-4) -> str | None:
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} detections"
    # Detections whose scores tie (within score_tol) may come in either order: float noise
    # of 1e-6 swaps them. Each one of `a` must have its own twin in `b` among the
    # detections of its phrase with a score that close.
    order = np.lexsort((-a.scores, a.phrase_ids))
    if not np.array_equal(a.phrase_ids[order], b.phrase_ids[np.lexsort((-b.scores, b.phrase_ids))]):
        return "phrases differ"
    free = np.ones(len(b), bool)
    worst_box = worst_score = 0.0
    for i in order:
        cand = np.flatnonzero(free & (b.phrase_ids == a.phrase_ids[i]) & (np.abs(b.scores - a.scores[i]) <= score_tol))
        if len(cand) == 0:
            near = np.flatnonzero(free & (b.phrase_ids == a.phrase_ids[i]))
            worst_score = max(worst_score, float(np.abs(b.scores[near] - a.scores[i]).min()) if len(near) else 1.0)
            continue
        dist = np.abs(b.boxes[cand] - a.boxes[i]).max(1)
        j = cand[int(dist.argmin())]
        free[j] = False
        worst_box = max(worst_box, float(dist.min()))
    if worst_score:
        return f"scores differ by up to {worst_score:.2e}"
    if worst_box > 0.05:
        return f"boxes differ by up to {worst_box:.3f} px"
    return None


def compare_detections(model: GLIPv2, onnx_dir: Path, images: list[np.ndarray], top_k: int,
                       tokenizer: Tokenizer, report: ParityReport) -> None:
    torch_pipe = TorchPredictor(model, tokenizer, top_k=top_k)
    ort_pipe = DetectionPipeline(OrtEngine(onnx_dir), model.cfg.image_hw, tokenizer,
                                 PostprocessConfig.for_model(model.cfg))
    for prompt_text in PROMPTS:
        prompts = [build_prompt(prompt_text)] * len(images)
        for i, (a, b) in enumerate(zip(torch_pipe.predict(images, prompts), ort_pipe.predict(images, prompts))):
            report.detections += len(a)
            problem = same_detections(a, b)
            if problem:
                report.detection_mismatches.append(f"image {i}, prompt {prompt_text!r}: {problem}")
    report.images = len(images)


def sample_images(data: Path | None, n: int) -> list[np.ndarray]:
    """n images of a generated split, or freshly drawn shapes-world scenes."""
    if data is not None:
        from training.data import CocoDetectionDataset

        ds = CocoDetectionDataset(data / "instances.json", data / "images")
        return [ds[i].image for i in range(min(n, len(ds)))]
    from training import shapes_world as sw

    out = []
    for i in range(n):
        rng = np.random.default_rng([7, i])
        out.append(sw.render(sw.sample_scene(rng), rng))
    return out


def verify(checkpoint: Path, onnx_dir: Path | None = None, data: Path | None = None, num_images: int = 8,
           top_k: int = 100) -> ParityReport:
    model, _ = load_model(checkpoint)
    tokenizer = Tokenizer()
    report = ParityReport()
    with tempfile.TemporaryDirectory() as tmp:
        if onnx_dir is None:
            onnx_dir = Path(tmp)
            export_onnx(model, onnx_dir, top_k)
        engine = OrtEngine(onnx_dir)
        images = sample_images(data, num_images)
        compare_outputs(model, engine, top_k, tokenizer, report)
        compare_detections(model, onnx_dir, images, top_k, tokenizer, report)
        compare_understanding(model, engine, images, tokenizer, report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--onnx-dir", type=Path,
                   help="an export folder (<graph>.onnx) or a Triton repository (default: export now)")
    p.add_argument("--data", type=Path, help="a generated split (default: draw fresh shapes-world images)")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--top-k", type=int, default=100, help="the K the detector graph was exported with")
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args(argv)
    for name in ("text_encoder", "detector"):
        if args.onnx_dir is not None and not model_file(args.onnx_dir, name, "onnx").is_file():
            print(f"error: {model_file(args.onnx_dir, name, 'onnx')} does not exist", file=sys.stderr)
            return 2
    try:
        report = verify(args.checkpoint, args.onnx_dir, args.data, args.num_images, args.top_k)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, value in report.max_abs.items():
        print(f"max |onnx - torch| {name:<15} {value:.2e}")
    print(f"detections: {report.detections} on {report.images} images x {len(PROMPTS)} prompts, "
          f"{len(report.detection_mismatches)} mismatches")
    for m in report.detection_mismatches[:10]:
        print("  " + m)
    if report.answers or report.captions:
        print(f"answers: {report.answers}, {len(report.answer_mismatches)} mismatches; "
              f"captions: {report.captions}, {len(report.caption_mismatches)} mismatches")
    for m in (report.answer_mismatches + report.caption_mismatches)[:10]:
        print("  " + m)
    if args.json:
        args.json.write_text(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    print("parity OK" if report.ok else "parity FAILED")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
