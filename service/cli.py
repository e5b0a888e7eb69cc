"""The `glipv2` command: `glipv2 detect IMAGE --prompt ...` and `glipv2 serve`.

detect runs the embedded backend (ONNX Runtime, in this process) on one image — the same
code the gateway runs (service.images for decoding and limits, service.backends for
tokenizing, the prompt cache, the engine and postprocessing) — prints the detections as a
table or JSON, and with --out draws the boxes with "phrase score" labels.

serve runs the gateway like `python -m service`, with command-line overrides of the
GLIPV2_* settings.

Exit codes: 0 ok, 2 bad usage or input (missing image, unsupported image format, empty
or over-long prompt, missing model repository), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main", "draw_detections"]

_PALETTE = [(255, 64, 64), (64, 160, 255), (40, 200, 80), (255, 170, 0), (200, 80, 255), (0, 210, 210),
            (255, 100, 180), (150, 150, 40)]


class CLIError(Exception):
    """A user error: printed as 'glipv2: error: ...', exit code 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glipv2", description="GLIPv2 open-vocabulary detection: detect or serve.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{detect,serve}")

    d = sub.add_parser("detect", help="detect the prompt's phrases in an image (embedded ONNX Runtime)")
    d.add_argument("image", type=Path, help="JPEG, PNG or WebP file")
    d.add_argument("--prompt", "-p", required=True, help="phrases separated by '.': 'red circle. star.'")
    d.add_argument("--out", "-o", type=Path, help="write the image with the boxes drawn here (PNG, JPEG or WebP)")
    d.add_argument("--threshold", "-t", type=float, default=0.3, help="minimum score (default 0.3)")
    d.add_argument("--max-detections", type=int, default=100, help="at most this many boxes (default 100)")
    d.add_argument("--repository", "-r", type=Path, default=Path("model_repository"),
                   help="rendered model repository (default model_repository)")
    d.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = its default)")
    d.add_argument("--json", action="store_true", help="print JSON instead of a table")

    s = sub.add_parser("serve", help="serve the HTTP gateway (like `python -m service`)")
    s.add_argument("--host", help="default GLIPV2_HOST or 127.0.0.1")
    s.add_argument("--port", type=int, help="default GLIPV2_PORT or 8000")
    s.add_argument("--backend", choices=("embedded", "triton"), help="default GLIPV2_BACKEND or embedded")
    s.add_argument("--repository", type=Path, help="default GLIPV2_REPOSITORY or model_repository")
    s.add_argument("--triton-url", help="default GLIPV2_TRITON_URL or localhost:8001")
    s.add_argument("--log-level", help="default GLIPV2_LOG_LEVEL or info")
    return p


# ------------------------------------------------------------------------------ detect


def _detect(args: argparse.Namespace) -> dict:
    from glipv2.image import letterbox
    from glipv2.text import PromptError
    from service.backends import BatchItem
    from service.errors import ServiceError
    from service.images import decode_image
    from service.routes.detect import _postprocess_config
    from service.settings import Settings

    if not args.prompt.strip():
        raise CLIError("the prompt is empty: give phrases such as --prompt 'red circle. star.'")
    if not 0.0 <= args.threshold <= 1.0:
        raise CLIError(f"--threshold must be in [0, 1], not {args.threshold}")
    if args.max_detections < 1:
        raise CLIError("--max-detections must be at least 1")
    if not args.image.is_file():
        raise CLIError(f"{args.image}: no such image file")
    repo = args.repository
    if not (repo / "manifest.json").is_file():
        raise CLIError(f"{repo}: not a model repository (no manifest.json); run `make export` or pass --repository")
    for model in ("text_encoder", "detector"):
        if not (repo / model / "1" / "model.onnx").is_file():
            raise CLIError(f"{repo / model / '1' / 'model.onnx'}: missing; run `make export`")

    settings = Settings(repository=repo)
    try:
        pixels_hwc = decode_image(args.image.read_bytes(), settings.max_image_pixels)
    except ServiceError as exc:  # 415 format, 413 pixels, 422 corrupt
        raise CLIError(f"{args.image}: {exc.detail}") from None

    from service.backends.embedded import EmbeddedBackend

    try:
        backend = EmbeddedBackend(repo, cache_size=0, threads=args.threads)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    try:
        try:
            tokenized = backend.tokenize(args.prompt)
        except PromptError as exc:
            raise CLIError(f"prompt: {exc}") from None
        cfg = _postprocess_config(backend, args.threshold, args.max_detections)
        pixels, lb = letterbox(pixels_hwc, backend.image_hw)
        item = BatchItem(pixels=pixels, letterbox=lb, prompt=tokenized, postprocess=cfg)
        det = backend.run_batch([item])[0]
        phrases = list(tokenized.prompt.phrases)
    finally:
        backend.close()
    detections = [
        {"box": [round(float(v), 2) for v in box], "score": round(float(s), 4),
         "phrase": phrases[int(p)], "phrase_index": int(p)}
        for box, s, p in zip(det.boxes, det.scores, det.phrase_ids)
        if float(s) >= args.threshold
    ]
    return {"image": str(args.image), "width": int(pixels_hwc.shape[1]), "height": int(pixels_hwc.shape[0]),
            "prompt": tokenized.prompt.text, "phrases": phrases, "detections": detections,
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


# ------------------------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from service.__main__ import configure_logging
    from service.app import create_app
    from service.settings import Settings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "backend": args.backend,
                                   "repository": args.repository, "triton_url": args.triton_url,
                                   "log_level": args.log_level}.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise CLIError(f"bad settings: {exc}") from None
    if settings.backend == "embedded" and not (settings.repository / "manifest.json").is_file():
        raise CLIError(f"{settings.repository}: not a model repository (no manifest.json); run `make export`")
    configure_logging(settings.log_level)
    # as service.__main__.main, with the overridden settings
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level, access_log=False, timeout_graceful_shutdown=30)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"detect": cmd_detect, "serve": cmd_serve}[args.command](args)
    except CLIError as exc:
        print(f"glipv2: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
