"""The `glipv2` command: `glipv2 detect IMAGE --prompt ...`, `glipv2 vqa IMAGE --question ...`,
`glipv2 caption IMAGE`, `glipv2 serve` and `glipv2 convert --official FILE.pth --out glip_t.pt`.

detect, vqa and caption run the embedded backend (ONNX Runtime, in this process) on one
image — the same code the gateway runs (service.images for decoding and limits,
service.backends for tokenizing, the prompt cache, the engines, postprocessing and caption
decoding). detect prints the detections as a table or JSON, and with --out draws the
boxes with "phrase score" labels; vqa prints the ranked answers; caption the caption.

serve runs the gateway like `python -m service`, with command-line overrides of the
GLIPV2_* settings.

convert turns an official GLIP-T checkpoint (microsoft/GLIP) into a glipv2-serve
checkpoint and prints the key report (glipv2.official); it needs torch (the [export] or
[train] extra), which the other commands never import. Exit 1 when a key is missing or
mis-shaped (the report names them).

Exit codes: 0 ok, 2 bad usage or input (missing image, unsupported image format, empty
or over-long prompt or question, missing model repository, a model without the task's
head), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from glipv2.captioning import DEFAULT_BEAM, MAX_BEAM

__all__ = ["main", "draw_detections"]

_PALETTE = [(255, 64, 64), (64, 160, 255), (40, 200, 80), (255, 170, 0), (200, 80, 255), (0, 210, 210),
            (255, 100, 180), (150, 150, 40)]


class CLIError(Exception):
    """A user error: printed as 'glipv2: error: ...', exit code 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glipv2", description="GLIPv2: detect, answer questions, caption, or serve.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{detect,vqa,caption,serve,convert}")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--repository", "-r", type=Path, default=Path("model_repository"),
                       help="rendered model repository (default model_repository)")
        q.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = its default)")
        q.add_argument("--json", action="store_true", help="print JSON instead of text")

    d = sub.add_parser("detect", help="detect the prompt's phrases in an image (embedded ONNX Runtime)")
    d.add_argument("image", type=Path, help="JPEG, PNG or WebP file")
    d.add_argument("--prompt", "-p", required=True, help="phrases separated by '.': 'red circle. star.'")
    d.add_argument("--out", "-o", type=Path, help="write the image with the boxes drawn here (PNG, JPEG or WebP)")
    d.add_argument("--threshold", "-t", type=float, default=None,
                   help="keep detections scoring above this (default: the model's, as the API: "
                        "/v1/models postprocess.score_threshold)")
    d.add_argument("--max-detections", type=int, default=100, help="at most this many boxes (default 100)")
    common(d)

    v = sub.add_parser("vqa", help="answer a question about an image (embedded ONNX Runtime)")
    v.add_argument("image", type=Path, help="JPEG, PNG or WebP file")
    v.add_argument("--question", "-q", required=True, help="e.g. 'what color is the star?'")
    v.add_argument("--top-k", type=int, default=5, help="ranked answers to show (default 5)")
    common(v)

    c = sub.add_parser("caption", help="caption an image (embedded ONNX Runtime)")
    c.add_argument("image", type=Path, help="JPEG, PNG or WebP file")
    c.add_argument("--beam-size", type=int, default=DEFAULT_BEAM,
                   help=f"hypotheses kept while decoding, 1..{MAX_BEAM} (default {DEFAULT_BEAM}; 1 = greedy, fastest)")
    c.add_argument("--max-len", type=int, default=None, help="at most this many tokens (default: the model's limit)")
    c.add_argument("--grounded", action="store_true",
                   help="also ground the caption: each object phrase with its box and score")
    c.add_argument("--unchecked", action="store_true",
                   help="decode without the detector check of the model's checked phrases (by default a caption "
                        "names one, e.g. 'red circle', only where the detector finds it)")
    common(c)

    s = sub.add_parser("serve", help="serve the HTTP gateway (like `python -m service`)")
    s.add_argument("--host", help="default GLIPV2_HOST or 127.0.0.1")
    s.add_argument("--port", type=int, help="default GLIPV2_PORT or 8000")
    s.add_argument("--backend", choices=("embedded", "triton"), help="default GLIPV2_BACKEND or embedded")
    s.add_argument("--repository", type=Path, help="default GLIPV2_REPOSITORY or model_repository")
    s.add_argument("--triton-url", help="default GLIPV2_TRITON_URL or localhost:8001")
    s.add_argument("--log-level", help="default GLIPV2_LOG_LEVEL or info")

    k = sub.add_parser("convert", help="convert an official GLIP-T checkpoint (microsoft/GLIP) to a glipv2-serve one")
    k.add_argument("--official", type=Path, required=True, help="e.g. glip_tiny_model_o365_goldg.pth")
    k.add_argument("--out", type=Path, required=True, help="glipv2-serve checkpoint to write (e.g. glip_t.pt)")
    k.add_argument("--ema", action="store_true", help="convert the file's model_ema weights instead of model")
    k.add_argument("--verbose", "-v", action="store_true", help="also list every mapped key")
    return p


def cmd_convert(args: argparse.Namespace) -> int:
    try:
        from glipv2.checkpoint import CheckpointError, atomic_save
        from glipv2.official import checkpoint_from, convert_state_dict, read_official
    except ImportError as e:
        raise CLIError(f"convert needs torch: install the export extra ({e})") from e
    if not args.official.is_file():
        raise CLIError(f"{args.official} does not exist (download it from the GLIP model zoo)")
    try:
        state, report = convert_state_dict(read_official(args.official, args.ema))
    except CheckpointError as e:
        raise CLIError(str(e)) from e
    if args.verbose:
        print("\n".join(f"  {o} -> {m}" for o, m in report.mapped.items()))
    print(report.format())
    if not report.ok:
        print(f"glipv2: error: {args.official} does not convert: {len(report.missing)} missing, "
              f"{len(report.misshaped)} mis-shaped (listed above); nothing written", file=sys.stderr)
        return 1
    atomic_save(checkpoint_from(state, report, args.official, args.ema), args.out)
    print(f"wrote {args.out} (preset glip-t)")
    return 0


# ------------------------------------------------------------------------------ detect


def check_exported(repo: Path) -> None:
    """CLIError naming what is missing and what to run, before anything opens the files
    (the tokenizer library's own error names no file). A fresh clone has the manifest and
    configs (in git) but not the generated tokenizer and ONNX files."""
    export = "run `make export` (add CHECKPOINT=path/to/your.pt for your own model) or pass --repository"
    try:
        models = list(json.loads((repo / "manifest.json").read_text())["models"])
    except FileNotFoundError:
        raise CLIError(f"{repo}: not a model repository (no manifest.json); {export}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CLIError(f"{repo / 'manifest.json'}: unreadable ({exc}); {export}") from None
    missing = [name for name in ["tokenizer.json", *(f"{m}/1/model.onnx" for m in models)]
               if not (repo / name).is_file()]
    if missing:
        raise CLIError(f"{repo} is not exported yet (missing {', '.join(missing)}); {export}")


def _letterbox(pixels_hwc, backend):
    """The image as the exported model expects it: the manifest's padding and long-side cap."""
    from glipv2.image import letterbox

    layout = backend.manifest.image
    return letterbox(pixels_hwc, backend.image_hw, layout.pad_value, max_side=layout.max_side)


def _open(args: argparse.Namespace):
    """(decoded image [H, W, 3], EmbeddedBackend) for a command; CLIError on bad input."""
    from service.errors import ServiceError
    from service.images import decode_image
    from service.settings import Settings

    if not args.image.is_file():
        raise CLIError(f"{args.image}: no such image file")
    repo = args.repository
    check_exported(repo)
    settings = Settings(repository=repo)
    try:
        pixels_hwc = decode_image(args.image.read_bytes(), settings.max_image_pixels)
    except ServiceError as exc:  # 415 format, 413 pixels, 422 corrupt
        raise CLIError(f"{args.image}: {exc.detail}") from None

    from service.backends.embedded import EmbeddedBackend

    try:
        backend = EmbeddedBackend(repo, cache_size=0, threads=args.threads)
    except (FileNotFoundError, ValueError) as exc:  # a missing ONNX file names `make export`
        raise CLIError(str(exc)) from None
    return pixels_hwc, backend


def _detect(args: argparse.Namespace) -> dict:
    from glipv2.text import PromptError
    from service.backends import BatchItem

    if not args.prompt.strip():
        raise CLIError("the prompt is empty: give phrases such as --prompt 'red circle. star.'")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise CLIError(f"--threshold must be in [0, 1], not {args.threshold}")
    if args.max_detections < 1:
        raise CLIError("--max-detections must be at least 1")
    pixels_hwc, backend = _open(args)
    try:
        try:
            tokenized = backend.tokenize(args.prompt)
        except PromptError as exc:
            raise CLIError(f"prompt: {exc}") from None
        cfg = backend.manifest.postprocess_with(args.threshold, args.max_detections)
        pixels, lb = _letterbox(pixels_hwc, backend)
        item = BatchItem(pixels=pixels, letterbox=lb, prompt=tokenized, postprocess=cfg)
        det = backend.run_batch([item])[0]
        phrases = list(tokenized.prompt.phrases)
    finally:
        backend.close()
    detections = [
        {"box": [round(float(v), 2) for v in box], "score": round(float(s), 4),
         "phrase": phrases[int(p)], "phrase_index": int(p)}
        for box, s, p in zip(det.boxes, det.scores, det.phrase_ids)
    ]
    return {"image": str(args.image), "width": int(pixels_hwc.shape[1]), "height": int(pixels_hwc.shape[0]),
            "prompt": tokenized.prompt.text, "phrases": phrases, "score_threshold": cfg.score_threshold,
            "detections": detections,
            "_pixels": pixels_hwc}


def draw_detections(pixels_hwc, detections: list[dict]):
    """A PIL image of pixels_hwc (uint8 [H, W, 3]) with each detection's box and a
    'phrase score' label drawn, one colour per phrase index."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(pixels_hwc).convert("RGB")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    width = max(2, round(min(img.size) / 200))
    for d in sorted(detections, key=lambda d: d["score"]):  # best drawn last, on top
        colour = _PALETTE[d["phrase_index"] % len(_PALETTE)]
        # whole pixels, clipped to the image, so every edge is visible (the box's pixels
        # [x0, x1] x [y0, y1] with round() ends; the line grows inward)
        x0, x1 = (min(max(round(v), 0), img.width - 1) for v in (d["box"][0], d["box"][2]))
        y0, y1 = (min(max(round(v), 0), img.height - 1) for v in (d["box"][1], d["box"][3]))
        draw.rectangle([x0, y0, max(x1, x0), max(y1, y0)], outline=colour, width=width)
        label = f"{d['phrase']} {d['score']:.2f}"
        tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), label, font=font)
        tw, th = tx1 - tx0 + 4, ty1 - ty0 + 4
        ly = y0 - th if y0 - th >= 0 else y0  # above the box, inside it at the top edge
        lx = min(max(0.0, x0), max(0.0, img.width - tw))
        draw.rectangle([lx, ly, lx + tw, ly + th], fill=colour)
        draw.text((lx + 2 - tx0, ly + 2 - ty0), label, fill=(0, 0, 0) if sum(colour) > 400 else (255, 255, 255),
                  font=font)
    return img


def _print_table(result: dict, out=None) -> None:
    out = out or sys.stdout
    dets = result["detections"]
    print(f"{result['image']}: {result['width']}x{result['height']}, prompt {result['prompt']!r}, "
          f"{len(dets)} detection{'s' if len(dets) != 1 else ''}", file=out)
    if not dets:
        return
    wp = max(len("phrase"), *(len(d["phrase"]) for d in dets))
    print(f"{'#':>3}  {'phrase':<{wp}}  {'score':>6}  {'x0':>8} {'y0':>8} {'x1':>8} {'y1':>8}", file=out)
    for i, d in enumerate(dets):
        x0, y0, x1, y1 = d["box"]
        print(f"{i:>3}  {d['phrase']:<{wp}}  {d['score']:>6.3f}  {x0:>8.1f} {y0:>8.1f} {x1:>8.1f} {y1:>8.1f}", file=out)


def cmd_detect(args: argparse.Namespace) -> int:
    if args.out is not None and args.out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise CLIError(f"--out {args.out}: use a .png, .jpg or .webp file name")
    result = _detect(args)
    pixels = result.pop("_pixels")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        draw_detections(pixels, result["detections"]).save(args.out)
        result["out"] = str(args.out)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
        if args.out is not None:
            print(f"wrote {args.out}")
    return 0


# ------------------------------------------------------------------------ vqa, caption


def cmd_vqa(args: argparse.Namespace) -> int:
    from glipv2.text import PromptError
    from glipv2.runtime.batch import TaskUnavailable, VqaBatchItem

    if not args.question.strip():
        raise CLIError("the question is empty: e.g. --question 'what color is the star?'")
    if not 1 <= args.top_k <= 20:
        raise CLIError("--top-k must be in 1..20")
    pixels_hwc, backend = _open(args)
    try:
        try:
            ids = backend.encode_question(args.question)
        except (PromptError, TaskUnavailable) as exc:
            raise CLIError(str(exc)) from None
        answer = backend.run_vqa_batch([VqaBatchItem(_letterbox(pixels_hwc, backend)[0], ids, args.top_k)])[0]
    finally:
        backend.close()
    result = {"image": str(args.image), "question": args.question, "answer": answer.answer,
              "score": round(answer.score, 4), "top_answers": [{"answer": a, "score": round(s, 4)} for a, s in answer.top]}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.image}: {args.question}")
        for a, s in answer.top:
            print(f"  {s:6.3f}  {a}")
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from glipv2.runtime.batch import CaptionBatchItem
    from glipv2.understanding import GROUNDING_SCORE_FLOOR
    from service.routes.understanding import caption_phrases

    if not 1 <= args.beam_size <= MAX_BEAM:
        raise CLIError(f"--beam-size must be in 1..{MAX_BEAM}")
    pixels_hwc, backend = _open(args)
    try:
        if "caption" not in backend.tasks:
            raise CLIError("this model has no caption decoder (its checkpoint was trained without captions)")
        limit = backend.caption_max_len
        max_len = args.max_len or limit
        if not 1 <= max_len <= limit:
            raise CLIError(f"--max-len must be in 1..{limit} for this model")
        pixels, box = _letterbox(pixels_hwc, backend)
        ground = backend.manifest.postprocess_with(GROUNDING_SCORE_FLOOR) if args.grounded else None
        check = None if args.unchecked else backend.manifest.caption_check()
        caption = backend.run_caption_batch([CaptionBatchItem(pixels, args.beam_size, max_len, ground, box, check)])[0]
    finally:
        backend.close()
    phrases = caption_phrases(caption.phrases)
    if args.json:
        record = {"image": str(args.image), "caption": caption.text, "logprob": round(caption.logprob, 4),
                  "num_tokens": caption.num_tokens, "checked": caption.checked}
        if phrases is not None:
            record["phrases"] = [p.model_dump() for p in phrases]
        print(json.dumps(record, indent=2))
    else:
        print(f"{args.image}: {caption.text}")
        for p in phrases or []:
            where = " ".join(f"[{', '.join(f'{v:.0f}' for v in b.box)}] {b.score:.2f}" for b in p.boxes) or "not found"
            print(f"  {p.phrase}: {where}")
    return 0


# ------------------------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service.__main__ import serve
    from service.settings import Settings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "backend": args.backend,
                                   "repository": args.repository, "triton_url": args.triton_url,
                                   "log_level": args.log_level}.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise CLIError(f"bad settings: {exc}") from None
    if settings.backend == "embedded":
        check_exported(settings.repository)
    serve(settings)  # as service.__main__.main, with the overridden settings
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"detect": cmd_detect, "vqa": cmd_vqa, "caption": cmd_caption, "serve": cmd_serve,
                "convert": cmd_convert}[args.command](args)
    except CLIError as exc:
        print(f"glipv2: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
