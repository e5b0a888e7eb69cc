"""Caption throughput: images decoded one request at a time vs as one batch, side by side.

`python -m bench.caption_throughput` runs the gateway's embedded backend (ONNX Runtime on
model_repository/, the code /v1/caption calls) on freshly drawn shapes-world images
(`--backend triton`: the Triton backend against the local tritonserver serving the same
repository, cpu flavour; the decoder caches then travel with every step request):
- sequential: one run_caption_batch call per image (what a gateway without batching does);
- batched: run_caption_batch on batches of --batch images (what the micro-batcher forms
  under concurrent load: every row decodes in lockstep, finished rows leave the batch).
The two alternate --rounds times (so machine noise hits both alike); medians, images/s and
the ratio are printed and appended to runs/bench/caption_throughput.jsonl (the committed
bench/results/ with --record; see bench/output.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bench.output import add_record_flag, results_file
from glipv2.image import letterbox
from glipv2.runtime.batch import CaptionBatchItem
from service.backends.embedded import EmbeddedBackend
from training import shapes_world as sw



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.caption_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", choices=("embedded", "triton"), default="embedded")
    p.add_argument("--no-save", action="store_true")
    add_record_flag(p)
    args = p.parse_args(argv)
    server = None
    if args.backend == "triton":
        from export.local_triton import TritonServer, install
        from service.backends.triton import TritonBackend

        server = TritonServer(args.repository, root=install())
        server.start()
        server.wait_ready(timeout=120)
        backend = TritonBackend(args.repository, server.url_grpc)
    else:
        backend = EmbeddedBackend(args.repository, threads=args.threads)
    try:
        return _run(args, backend)
    finally:
        backend.close()
        if server is not None:
            server.stop()
            server.cleanup()


def _run(args: argparse.Namespace, backend) -> int:
    if "caption" not in backend.tasks:
        print(f"error: {args.repository} has no caption decoder", file=sys.stderr)
        return 2
    rng = np.random.default_rng(2026)
    items = []
    for _ in range(args.images):
        scene = sw.sample_scene(rng)
        items.append(CaptionBatchItem(letterbox(sw.render(scene, rng), backend.image_hw)[0], args.beam_size, 30))

    def sequential() -> list[str]:
        return [backend.run_caption_batch([it])[0].text for it in items]

    def batched() -> list[str]:
        return [c.text for i in range(0, len(items), args.batch) for c in backend.run_caption_batch(items[i:i + args.batch])]

    assert sequential() == batched(), "batched decoding changed a caption"  # also warms both paths up
    times: dict[str, list[float]] = {"sequential": [], "batched": []}
    for _ in range(args.rounds):
        for name, fn in (("sequential", sequential), ("batched", batched)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(), "device": "cpu", "backend": args.backend, "threads": args.threads,
        "repository": str(args.repository), "images": args.images, "batch": args.batch, "beam_size": args.beam_size,
        "sequential_s": med["sequential"], "batched_s": med["batched"],
        "sequential_images_per_s": args.images / med["sequential"], "batched_images_per_s": args.images / med["batched"],
        "speedup_batched_over_sequential": med["sequential"] / med["batched"],
    }
    print(f"captions of {args.images} images, {args.backend}, beam {args.beam_size}, {args.threads} threads: "
          f"sequential {row['sequential_images_per_s']:.1f} img/s, batch {args.batch} "
          f"{row['batched_images_per_s']:.1f} img/s ({row['speedup_batched_over_sequential']:.2f}x)")
    if not args.no_save:
        out = results_file("caption_throughput.jsonl", args.record)
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"appended to {out}")
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
