"""GLIP-T (official layout) at 800 x 1333 on this CPU: PyTorch eager vs ONNX Runtime, and
Hugging Face's GroundingDinoForObjectDetection (tiny: Swin-T + BERT-base) side by side.

    python -m bench.official_latency [--checkpoint glip_tiny_model_o365_goldg.pth] [--repeats 3]

Without --checkpoint the official layout is filled with random weights
(glipv2.official.random_official_state_dict; nothing is downloaded); Grounding DINO is
built from its default (tiny) config with random weights. Latency does not depend on the
weights. Every backend runs in its own fresh process (batch 1, the same image and prompt,
`--threads` intra-op threads), so its peak resident memory (ru_maxrss) is its own. The
GLIP-T ONNX graphs are exported first (text_encoder + detector, as `make export` does);
ONNX Runtime's outputs are compared with PyTorch's on the same input (parity figures).
Grounding DINO's ONNX export is attempted too; when it exports, ONNX Runtime runs it in a
fourth process. Prints a table and appends one JSON line to runs/bench/official_latency.jsonl
(bench/results/ with --record).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import numpy as np

from bench.output import add_record_flag, append_records

ROOT = Path(__file__).resolve().parents[1]
KEYS = ROOT / "tests" / "fixtures" / "official_glip" / "glip_t_keys.json"
PROMPT = "person. bicycle. traffic light."
IMAGE_HW = (800, 1333)  # the resized image (official MIN/MAX_SIZE_TEST); the canvas is 800 x 1344


def _image() -> np.ndarray:
    sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "official_glip"))
    from generate import fixture_image

    return fixture_image(IMAGE_HW)


def _glip_model(checkpoint: str | None):
    import torch

    from glipv2.checkpoint import load_model
    from glipv2.config import get_preset
    from glipv2.modeling.glipv2 import build_model
    from glipv2.official import convert_state_dict, random_official_state_dict

    if checkpoint:
        model, _ = load_model(checkpoint)
        return model
    state, report = convert_state_dict(random_official_state_dict(json.loads(KEYS.read_text())["keys"], 0))
    assert report.ok, report.format()
    model = build_model(get_preset("glip-t"), pretrained_text=False)
    model.load_state_dict(state, strict=False)
    return model.eval()


def _inputs(cfg):
    from glipv2.image import letterbox, pad_value_for
    from glipv2.text import Tokenizer, build_prompt, tokenize

    pixels, _ = letterbox(_image(), cfg.image_hw, pad_value_for(cfg.pixel_mean, cfg.bgr, cfg.pad_with_mean),
                          max_side=cfg.resize_max_side)
    t = tokenize(Tokenizer(), build_prompt(PROMPT))
    return pixels[None], t.input_ids.astype(np.int64)[None], t.attention_mask.astype(np.int64)[None]


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def worker_torch(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model = _glip_model(args.checkpoint)
    images, ids, mask = _inputs(model.cfg)
    im, i, m = torch.from_numpy(images), torch.from_numpy(ids), torch.from_numpy(mask)

    def run():  # what the text_encoder + detector graphs compute
        with torch.no_grad():
            return [t.numpy() for t in model.top_k(model(im, i, m), m, args.top_k)]

    times = _time(run, args.repeats)
    np.savez(Path(args.work) / "torch_out.npz", *run())
    if args.export:
        from export.onnx_export import export_onnx
        from export.trt_ops import unsupported_ops

        t0 = time.perf_counter()
        files = export_onnx(model, Path(args.work) / "onnx", top_k=args.top_k)
        export_s = time.perf_counter() - t0
        ops = {name: unsupported_ops(path) for name, path in files.items()}
        return {"times_ms": times, "export_s": export_s, "trt_op_check": ops}
    return {"times_ms": times}


def worker_ort(args) -> dict:
    import onnxruntime as ort

    from glipv2.config import get_preset

    cfg = get_preset("glip-t")
    images, ids, mask = _inputs(cfg)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    onnx = Path(args.work) / "onnx"
    text = ort.InferenceSession(str(onnx / "text_encoder.onnx"), opts, providers=["CPUExecutionProvider"])
    det = ort.InferenceSession(str(onnx / "detector.onnx"), opts, providers=["CPUExecutionProvider"])

    def run():
        (feats,) = text.run(None, {"input_ids": ids, "attention_mask": mask})
        return det.run(None, {"images": images, "token_features": feats, "attention_mask": mask})

    times = _time(run, args.repeats)
    np.savez(Path(args.work) / "ort_out.npz", *run())
    return {"times_ms": times}


def _gdino_inputs():
    """Grounding DINO's inputs for the same image and prompt: RGB in [0, 1] normalised with
    ImageNet statistics (its image processor's defaults), the BERT-base-uncased tokens."""
    import torch
    from transformers import BertTokenizerFast

    from glipv2.modeling.language import minilm_dir

    tok = BertTokenizerFast.from_pretrained(str(minilm_dir()), local_files_only=True)  # bert-base-uncased vocab
    enc = tok([PROMPT], return_tensors="pt")
    img = torch.from_numpy(_image()).permute(2, 0, 1)[None].float() / 255.0
    pixel_values = (img - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor(
        [0.229, 0.224, 0.225])[:, None, None]
    mask = torch.ones(1, *IMAGE_HW, dtype=torch.long)
    return pixel_values, enc.input_ids, enc.token_type_ids, enc.attention_mask, mask


GDINO_INPUTS = ("pixel_values", "input_ids", "token_type_ids", "attention_mask", "pixel_mask")


@contextlib.contextmanager
def _onnx_friendly_text_masks():
    """transformers' Grounding DINO builds its phrase masks from the token ids with
    torch.isin, torch.cummax and torch.cummin, which have no ONNX symbolic (opset 17), and a
    bool torch.eye, whose EyeLike node ONNX Runtime's CPU provider cannot run. While
    exporting, they are replaced by equivalent broadcast comparisons over the (short) token
    axis and a float eye compared with 0; the ONNX Runtime outputs are then compared with
    the PyTorch ones."""
    import torch

    def isin(elements, test_elements, **_):
        return (elements.unsqueeze(-1) == torch.as_tensor(test_elements).reshape(-1)).any(-1)

    def cumulative(reduce, fill):
        def op(x, dim):
            assert dim in (1, -1) and x.dim() == 2, "only what the text masks use"
            n = x.shape[1]
            upto = torch.ones(n, n, dtype=torch.bool).tril()  # [i, j]: j <= i
            vals = torch.where(upto, x.unsqueeze(1), torch.full((), fill, dtype=x.dtype))
            return reduce(vals, -1), None  # the callers use the values only
        return op

    eye = torch.eye

    def bool_eye(*shape, dtype=None, **kw):  # ONNX Runtime's CPU EyeLike has no bool kernel
        return eye(*shape, **kw) > 0 if dtype is torch.bool else eye(*shape, dtype=dtype, **kw)

    limits = torch.iinfo(torch.int64)
    with mock.patch.object(torch, "isin", isin), mock.patch.object(torch, "eye", bool_eye), \
            mock.patch.object(torch, "cummax", cumulative(torch.amax, limits.min)), \
            mock.patch.object(torch, "cummin", cumulative(torch.amin, limits.max)):
        yield


def worker_gdino(args) -> dict:
    import torch
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # The default config is Grounding DINO-T: Swin-T backbone, BERT-base text encoder, 900
    # queries, 6 + 6 layers. Built from the config: random weights, nothing downloaded.
    model = GroundingDinoForObjectDetection(GroundingDinoConfig()).eval()
    inputs = _gdino_inputs()

    class Outputs(torch.nn.Module):  # a tuple of tensors, what the ONNX exporter takes
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *xs):
            out = self.model(**dict(zip(GDINO_INPUTS, xs)))
            return out.logits, out.pred_boxes

    wrapped = Outputs().eval()

    def run():
        with torch.no_grad():
            return wrapped(*inputs)

    result = {"times_ms": _time(run, args.repeats),
              "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
    if args.export:
        path = Path(args.work) / "gdino.onnx"
        try:
            t0 = time.perf_counter()
            with warnings.catch_warnings(), torch.no_grad(), _onnx_friendly_text_masks():
                warnings.simplefilter("ignore")
                torch.onnx.export(wrapped, inputs, str(path), opset_version=17, dynamo=False,
                                  input_names=list(GDINO_INPUTS), output_names=["logits", "pred_boxes"])
            result["onnx_export"] = f"exported in {time.perf_counter() - t0:.0f} s"
            np.savez(Path(args.work) / "gdino_torch_out.npz", *[t.numpy() for t in run()])
        except Exception as e:  # record why; the comparison still stands without it
            path.unlink(missing_ok=True)
            result["onnx_export"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
    return result


def worker_gdino_ort(args) -> dict:
    import onnxruntime as ort

    inputs = {n: t.numpy() for n, t in zip(GDINO_INPUTS, _gdino_inputs())}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(Path(args.work) / "gdino.onnx"), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}  # the exporter drops inputs the trace never read

    def run():
        return sess.run(None, {n: v for n, v in inputs.items() if n in names})

    times = _time(run, args.repeats)
    want = np.load(Path(args.work) / "gdino_torch_out.npz")
    # equal entries count 0 (masked logits are -inf in both, and -inf - -inf is nan)
    diff = {name: float(np.abs(np.where(g == want[f"arr_{i}"], 0, g - want[f"arr_{i}"])).max()) for i, (name, g) in
            enumerate(zip(("logits", "pred_boxes"), run()))}
    return {"times_ms": times, "ort_vs_torch_max_abs_diff": diff}


def _child(kind: str, args, work: str) -> dict:
    cmd = [sys.executable, "-m", "bench.official_latency", "--worker", kind, "--work", work, "--threads",
           str(args.threads), "--repeats", str(args.repeats), "--top-k", str(args.top_k)]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    if kind in ("torch", "gdino") and not args.no_export:
        cmd += ["--export"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0 and kind == "gdino_ort":  # optional: recorded, the rest stands
        return {"error": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else f"exit {proc.returncode}"}
    if proc.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.official_latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="an official GLIP-T .pth (default: random weights in the official layout)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--no-export", action="store_true", help="skip Grounding DINO's ONNX export attempt")
    add_record_flag(p)
    p.add_argument("--worker", choices=("torch", "ort", "gdino", "gdino_ort"), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--export", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        res = {"torch": worker_torch, "ort": worker_ort, "gdino": worker_gdino,
               "gdino_ort": worker_gdino_ort}[args.worker](args)
        res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print(json.dumps(res))
        return 0

    with tempfile.TemporaryDirectory(prefix="glip-bench-") as work:
        rows = {}
        for kind in ("torch", "ort", "gdino", "gdino_ort"):
            if kind == "gdino_ort" and not (Path(work) / "gdino.onnx").is_file():
                continue  # its export failed (the reason is in rows["gdino"]) or was skipped
            print(f"running {kind} ...", flush=True)
            t0 = time.perf_counter()
            rows[kind] = _child(kind, args, work)
            got = (f"median {statistics.median(rows[kind]['times_ms']):.0f} ms" if "times_ms" in rows[kind]
                   else f"failed: {rows[kind].get('error')}")
            print(f"  {kind}: {got}, {time.perf_counter() - t0:.0f} s in all", flush=True)
        a, b = np.load(Path(work) / "torch_out.npz"), np.load(Path(work) / "ort_out.npz")
        parity = {name: float(np.abs(a[f"arr_{i}"] - b[f"arr_{i}"]).max())
                  for i, name in enumerate(("boxes", "logits", "centerness"))}
    med = {k: statistics.median(v["times_ms"]) for k, v in rows.items() if "times_ms" in v}
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.machine(),
        "cpus": len(__import__("os").sched_getaffinity(0)), "threads": args.threads, "device": "cpu",
        "image_hw": IMAGE_HW, "canvas_hw": [800, 1344], "prompt": PROMPT, "top_k": args.top_k,
        "weights": args.checkpoint or "random, official layout", "rows": rows,
        "median_ms": med, "load_average_at_end": __import__("os").getloadavg(), "ort_vs_torch_max_abs_diff": parity,
        "ratio_torch_over_ort": med["torch"] / med["ort"], "ratio_gdino_over_glip_torch": med["gdino"] / med["torch"],
        "ratio_gdino_over_glip_ort": med["gdino"] / med["ort"],
        **({"ratio_gdino_ort_over_glip_ort": med["gdino_ort"] / med["ort"]} if "gdino_ort" in med else {}),
    }
    print(f"{'backend':34s} {'median ms':>10s} {'peak RSS MB':>12s}")
    for k, label in (("torch", "GLIP-T PyTorch eager"), ("ort", "GLIP-T ONNX Runtime"),
                     ("gdino", "Grounding DINO-T (HF) PyTorch eager"), ("gdino_ort", "Grounding DINO-T ONNX Runtime")):
        if k not in med:
            continue
        print(f"{label:34s} {med[k]:10.0f} {rows[k]['peak_rss_mb']:12.0f}")
    print(f"GLIP-T PyTorch / ORT: {record['ratio_torch_over_ort']:.2f}x; Grounding DINO / GLIP-T ORT: "
          f"{record['ratio_gdino_over_glip_ort']:.2f}x; ORT vs PyTorch max |diff| {parity}")
    print(f"GLIP-T ONNX op check: {rows['torch'].get('trt_op_check')}; Grounding DINO ONNX: "
          f"{rows['gdino'].get('onnx_export', 'not attempted')}")
    append_records("official_latency.jsonl", [record], args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
