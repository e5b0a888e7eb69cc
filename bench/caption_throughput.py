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
All of them alternate --rounds times (so machine noise hits each alike); medians, images/s,
the batched/sequential ratio and each backend's batched throughput over the first one's
are printed, and one row per backend is appended to runs/bench/caption_throughput.jsonl
(the committed bench/results/ with --record; see bench/output.py).
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
from glipv2.image import letterbox
from glipv2.runtime.batch import CaptionBatchItem
from service.backends.embedded import EmbeddedBackend
from training import shapes_world as sw

BACKENDS = ("embedded", "triton", "triton-steps")


def _backends(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a comma-separated list of distinct backends among {list(BACKENDS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.caption_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--beam-size", type=int, default=1)
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
    items = []
    for _ in range(args.images):
        scene = sw.sample_scene(rng)
        items.append(CaptionBatchItem(letterbox(sw.render(scene, rng), first.image_hw)[0], args.beam_size, 30))

    def sequential(backend) -> list[str]:
        return [backend.run_caption_batch([it])[0].text for it in items]

    def batched(backend) -> list[str]:
        return [c.text for i in range(0, len(items), args.batch)
                for c in backend.run_caption_batch(items[i:i + args.batch])]

    reference = None
    for name, backend in backends.items():  # also warms every path up
        captions = sequential(backend)
        assert captions == batched(backend), f"{name}: batched decoding changed a caption"
        assert reference is None or captions == reference, f"{name} gives other captions than {args.backends[0]}"
        reference = captions
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name, backend in backends.items():
            for mode, fn in (("sequential", sequential), ("batched", batched)):
                t = time.perf_counter()
                fn(backend)
                times.setdefault((name, mode), []).append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load = os.getloadavg()[0]
    base = args.images / med[(args.backends[0], "batched")]
    rows = []
    for name in backends:
        seq, bat = med[(name, "sequential")], med[(name, "batched")]
        row = {
            "when": when, "machine": platform.machine(), "device": "cpu", "backend": name,
            "threads": args.threads, "repository": str(args.repository), "images": args.images, "batch": args.batch,
            "beam_size": args.beam_size, "load_average_1m": round(load, 2),
            "sequential_s": seq, "batched_s": bat,
            "sequential_images_per_s": args.images / seq, "batched_images_per_s": args.images / bat,
            "speedup_batched_over_sequential": seq / bat,
            f"batched_over_{args.backends[0]}": (args.images / bat) / base,
        }
        rows.append(row)
        print(f"captions of {args.images} images, {name}, beam {args.beam_size}: sequential "
              f"{row['sequential_images_per_s']:.1f} img/s, batch {args.batch} {row['batched_images_per_s']:.1f} img/s "
              f"({row['speedup_batched_over_sequential']:.2f}x)"
              + (f"; {row[f'batched_over_{args.backends[0]}']:.2f}x {args.backends[0]}" if len(backends) > 1 else ""))
    print(f"(load average {load:.2f} over the last minute)")
    if not args.no_save:
        append_records("caption_throughput.jsonl", rows, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
