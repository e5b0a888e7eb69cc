"""PyTorch eager vs ONNX Runtime latency of the exported graphs, side by side in one run.

`python -m bench.export_latency --checkpoint demo/tiny.pt` exports the checkpoint, then
for each batch size times both engines alternately (so machine noise hits both alike)
and prints median latencies and the ratio. A model with a box refiner is also exported
without it and timed in the same alternation, for the refiner's share of the detector's
time (`ort_unrefined_ms`). Results are appended to
runs/bench/export_latency.jsonl (bench/results/ with --record; see bench/output.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from export.onnx_export import export_onnx
from bench.output import add_record_flag, results_file
from glipv2.runtime.onnx import OrtEngine
from glipv2.checkpoint import CheckpointError, load_model
from glipv2.text import Tokenizer, build_prompt, pad_batch, tokenize

PROMPT = "circle. square. triangle. star. hexagon. cross."


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def run(checkpoint: Path, batches: Sequence[int], repeats: int, threads: int, top_k: int) -> list[dict]:
    torch.set_num_threads(threads)
    model, _ = load_model(checkpoint)
    tokenizer = Tokenizer()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, Path(tmp) / "model", top_k)
        engine = OrtEngine(Path(tmp) / "model", threads=threads)
        unrefined = None
        if model.box_refiner is not None:
            plain = copy.deepcopy(model)
            plain.box_refiner = None
            export_onnx(plain, Path(tmp) / "unrefined", top_k)
            unrefined = OrtEngine(Path(tmp) / "unrefined", threads=threads)
        h, w = model.cfg.image_hw
        for b in batches:
            images = np.random.default_rng(b).integers(0, 256, (b, 3, h, w), dtype=np.uint8)
            tb = pad_batch([tokenize(tokenizer, build_prompt(PROMPT))] * b)
            ids, mask = tb.input_ids, tb.attention_mask
            t_images, t_ids, t_mask = (torch.from_numpy(a) for a in (images, ids, mask))

            @torch.no_grad()
            def torch_run():
                return model.top_k(model(t_images, t_ids, t_mask), t_mask, top_k)

            def ort_run(engine=engine):
                return engine.detect(images, engine.encode_text(ids, mask), mask)

            torch_run(), ort_run()  # warm-up
            if unrefined is not None:
                ort_run(unrefined)
            torch_ms, ort_ms, unrefined_ms = [], [], []
            for i in range(repeats):  # alternate so drifts in machine load hit both
                torch_ms.append(_median_ms(torch_run, 1))
                if unrefined is None:
                    ort_ms.append(_median_ms(ort_run, 1))
                    continue
                # Each ONNX Runtime engine's threads spin on after its run and slow the next
                # one: the two engines take turns at going first.
                turns = [(ort_ms, engine), (unrefined_ms, unrefined)]
                for times, eng in turns if i % 2 == 0 else turns[::-1]:
                    times.append(_median_ms(lambda: ort_run(eng), 1))
            row = {"batch": b, "torch_ms": statistics.median(torch_ms), "ort_ms": statistics.median(ort_ms)}
            row["speedup_ort_over_torch"] = row["torch_ms"] / row["ort_ms"]
            line = (f"batch {b:>2}: PyTorch eager {row['torch_ms']:8.1f} ms   ONNX Runtime {row['ort_ms']:8.1f} ms"
                    f"   ratio {row['speedup_ort_over_torch']:.2f}x")
            if unrefined_ms:
                row["ort_unrefined_ms"] = statistics.median(unrefined_ms)
                row["refiner_cost"] = row["ort_ms"] / row["ort_unrefined_ms"]
                line += f"   (ONNX Runtime without the box refiner {row['ort_unrefined_ms']:.1f} ms: x{row['refiner_cost']:.2f})"
            rows.append(row)
            print(line, flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.export_latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("demo/tiny.pt"))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--out", type=Path, default=None, help="default runs/bench/export_latency.jsonl")
    add_record_flag(p)
    args = p.parse_args(argv)
    args.out = args.out or results_file("export_latency.jsonl", args.record)
    if not args.checkpoint.is_file():
        print(f"error: checkpoint {args.checkpoint} does not exist (the demo model is demo/tiny.pt; "
              "`make demo-model` trains it)", file=sys.stderr)
        return 2
    try:
        rows = run(args.checkpoint, args.batches, args.repeats, args.threads, args.top_k)
    except CheckpointError as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor() or
              platform.machine(), "device": "cpu", "threads": args.threads, "checkpoint": str(args.checkpoint),
              "rows": rows}
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
