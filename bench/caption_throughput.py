"""Caption throughput: images decoded one request at a time vs as one batch, and backends
side by side.

`python -m bench.caption_throughput` runs the gateway's embedded backend (ONNX Runtime on
model_repository/, the code /v1/caption calls) on freshly drawn shapes-world images.
`--backends embedded,triton,triton-steps` runs several backends in the same process on the
same images (the Triton ones against one local tritonserver serving the same repository,
cpu flavour):
- triton: the Triton backend as the gateway runs it: one request per batch to Triton's
  `caption` model, which decodes inside the server (export/triton_python/caption.py);
- triton-steps: the same server driven step by step from the gateway (caption_start, then
  one caption_step request per token, the decoder caches crossing gRPC every time): the
  path before the caption model, for the before/after figure.
For each backend:
- sequential: one run_caption_batch call per image (what a gateway without batching does);
- batched: run_caption_batch on batches of --batch images (what the micro-batcher forms
  under concurrent load: every row decodes in lockstep, finished rows leave the batch).
`--beam-size 1,3` measures beam sizes side by side the same way (the API decodes with beam
3 unless asked otherwise), and `--checked off,on` captions without and with the detector
check of the model's checked phrases (the API checks unless asked not to: one detector
call per 18 checked phrases per batch before decoding). All of them alternate --rounds times (so machine noise hits
each alike); medians, images/s, the batched/sequential ratio, each backend's batched
throughput over the first one's and each beam's over the first beam's are printed, and one
row per backend, beam size and check is appended to runs/bench/caption_throughput.jsonl (the
committed bench/results/ with --record; see bench/output.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bench.output import add_record_flag, append_records
from glipv2.captioning import MAX_BEAM
from glipv2.image import letterbox
from glipv2.runtime.batch import CaptionBatchItem
from service.backends.embedded import EmbeddedBackend
from training import shapes_world as sw

BACKENDS = ("embedded", "triton", "triton-steps")


def _distinct_choices(value: str, allowed, message: str) -> list[str]:
    """A comma-separated list of distinct names among `allowed`; else `message` as the error."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names or not set(names) <= set(allowed) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(message)
    return names


def _backends(value: str) -> list[str]:
    return _distinct_choices(value, BACKENDS, f"a comma-separated list of distinct backends among {list(BACKENDS)}")


def _beams(value: str) -> list[int]:
    try:
        beams = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        beams = []
    if not beams or len(set(beams)) != len(beams) or not all(1 <= b <= MAX_BEAM for b in beams):
        raise argparse.ArgumentTypeError(f"a comma-separated list of distinct beam sizes in 1..{MAX_BEAM}")
    return beams


def _checked(value: str) -> list[bool]:
    return [n == "on" for n in _distinct_choices(value, ("off", "on"), "off, on, or both side by side: off,on")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.caption_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--beam-size", type=_beams, default=[1], help="beam size, or several side by side: 1,3")
    p.add_argument("--checked", type=_checked, default=[False],
                   help="decode without (off) or with (on) the detector check, or both side by side: off,on")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads of the embedded backend")
    p.add_argument("--backends", type=_backends, default=["embedded"],
                   help=f"comma-separated, measured side by side; among {', '.join(BACKENDS)}")
    p.add_argument("--no-save", action="store_true")
    add_record_flag(p)
    args = p.parse_args(argv)
    server = None
    backends = {}
    try:
        if any(b.startswith("triton") for b in args.backends):
            from export.local_triton import TritonServer, install
            from service.backends.triton import TritonBackend

            server = TritonServer(args.repository, root=install())
            server.start()
            server.wait_ready(timeout=120)
        for name in args.backends:
            if name == "embedded":
                backends[name] = EmbeddedBackend(args.repository, threads=args.threads)
            else:
                backends[name] = TritonBackend(args.repository, server.url_grpc, caption_loop=name == "triton")
        return _run(args, backends)
    finally:
        for backend in backends.values():
            backend.close()
        if server is not None:
            server.stop()
            server.cleanup()


def _run(args: argparse.Namespace, backends: dict) -> int:
    first = next(iter(backends.values()))
    if "caption" not in first.tasks:
        print(f"error: {args.repository} has no caption decoder", file=sys.stderr)
        return 2
    rng = np.random.default_rng(2026)
    images = [letterbox(sw.render(scene, rng), first.image_hw)[0] for scene in
              (sw.sample_scene(rng) for _ in range(args.images))]
    check = first.manifest.caption_check()
    if any(args.checked) and check is None:
        print(f"error: {args.repository}'s model has no checked caption phrases (--checked on)", file=sys.stderr)
        return 2
    # the served default length limit: the model's (glipv2.understanding.CaptionPipeline)
    variants = [(beam, checked) for beam in args.beam_size for checked in args.checked]
    items = {(beam, checked): [CaptionBatchItem(px, beam, first.caption_max_len, check=check if checked else None)
                               for px in images] for beam, checked in variants}

    def sequential(backend, variant: tuple[int, bool]) -> list[str]:
        return [backend.run_caption_batch([it])[0].text for it in items[variant]]

    def batched(backend, variant: tuple[int, bool]) -> list[str]:
        return [c.text for i in range(0, args.images, args.batch)
                for c in backend.run_caption_batch(items[variant][i:i + args.batch])]

    for variant in variants:
        reference = None
        for name, backend in backends.items():  # also warms every path up
            captions = sequential(backend, variant)
            assert captions == batched(backend, variant), f"{name}: batched decoding changed a caption {variant}"
            assert reference is None or captions == reference, \
                f"{name} gives other captions than {args.backends[0]} (beam, checked: {variant})"
            reference = captions
    times: dict[tuple[str, tuple[int, bool], str], list[float]] = {}
    for _ in range(args.rounds):
        for variant in variants:
            for name, backend in backends.items():
                for mode, fn in (("sequential", sequential), ("batched", batched)):
                    t = time.perf_counter()
                    fn(backend, variant)
                    times.setdefault((name, variant, mode), []).append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load = os.getloadavg()[0]
    first_backend, first_beam, first_check = args.backends[0], args.beam_size[0], args.checked[0]
    check_name = {False: "unchecked", True: "checked"}
    rows = []
    for beam, checked in variants:
        for name in backends:
            v = (beam, checked)
            seq, bat = med[(name, v, "sequential")], med[(name, v, "batched")]
            row = {
                "when": when, "machine": platform.machine(), "device": "cpu", "backend": name,
                "threads": args.threads, "repository": str(args.repository), "images": args.images,
                "batch": args.batch, "beam_size": beam, "checked": checked, "max_len": first.caption_max_len,
                "load_average_1m": round(load, 2), "sequential_s": seq, "batched_s": bat,
                "sequential_images_per_s": args.images / seq, "batched_images_per_s": args.images / bat,
                "speedup_batched_over_sequential": seq / bat,
                f"batched_over_{first_backend}": med[(first_backend, v, "batched")] / bat,
                f"batched_over_beam_{first_beam}": med[(name, (first_beam, checked), "batched")] / bat,
                f"batched_over_{check_name[first_check]}": med[(name, (beam, first_check), "batched")] / bat,
            }
            rows.append(row)
            print(f"captions of {args.images} images, {name}, beam {beam}, {check_name[checked]}: sequential "
                  f"{row['sequential_images_per_s']:.1f} img/s, batch {args.batch} {row['batched_images_per_s']:.1f} "
                  f"img/s ({row['speedup_batched_over_sequential']:.2f}x)"
                  + (f"; {row[f'batched_over_{first_backend}']:.2f}x {first_backend}" if len(backends) > 1 else "")
                  + (f"; {row[f'batched_over_beam_{first_beam}']:.2f}x beam {first_beam}"
                     if len(args.beam_size) > 1 else "")
                  + (f"; {row[f'batched_over_{check_name[first_check]}']:.2f}x {check_name[first_check]}"
                     if len(args.checked) > 1 else ""))
    print(f"(load average {load:.2f} over the last minute)")
    if not args.no_save:
        append_records("caption_throughput.jsonl", rows, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
