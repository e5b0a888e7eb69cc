"""Render the Triton model repository from a checkpoint (what `make export` runs).

    python -m export.build --checkpoint demo/tiny.pt --out model_repository --flavour cpu \\
        --top-k 100 --max-batch-size 8

--checkpoint also takes an official GLIP-T file (microsoft/GLIP's .pth), converted on the
fly (glipv2.official; refused, naming the keys, if anything is missing or mis-shaped).

Exit status: 0 done, 2 a missing or unusable checkpoint or bad arguments, 1 a model the
repository refuses (e.g. an op TensorRT cannot parse). Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from export.repository import (
    FLAVOURS,
    INSTANCE_COUNT,
    MAX_QUEUE_DELAY_US,
    MAX_QUEUE_SIZE,
    QUEUE_TIMEOUT_US,
    TRT_CACHE_DIR,
    BatchingSettings,
    RepositoryError,
    SettingsError,
    default_repository,
    render_repository,
    repository_is_current,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a glipv2-serve checkpoint (e.g. demo/tiny.pt)")
    p.add_argument("--out", type=Path, default=None,
                   help="repository folder (replaced; built model.plan files are kept); default model_repository "
                        "for cpu, model_repository-<flavour> for the GPU flavours")
    p.add_argument("--force", action="store_true", help="replace a repository of another flavour")
    p.add_argument("--if-changed", action="store_true",
                   help="do nothing when the repository already is what this command would render")
    p.add_argument("--trt-cache-dir", default=TRT_CACHE_DIR,
                   help="gpu-onnx: ONNX Runtime's TensorRT engine cache inside the Triton container (mount a volume)")
    p.add_argument("--flavour", choices=FLAVOURS, default="cpu",
                   help="cpu: python backend + ONNX Runtime; gpu: tensorrt_plan; gpu-onnx: onnxruntime + TensorRT fp16")
    p.add_argument("--top-k", type=int, default=100, help="anchors kept inside the detector graph")
    p.add_argument("--image-hw", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="input canvas (multiples of 32; default: the checkpoint's, 800 1344 for glip-t)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--preferred-batch-sizes", type=int, nargs="+", default=None,
                   help="default: half the max batch and the max batch")
    p.add_argument("--max-queue-delay-us", type=int, default=MAX_QUEUE_DELAY_US)
    p.add_argument("--max-queue-size", type=int, default=MAX_QUEUE_SIZE)
    p.add_argument("--queue-timeout-us", type=int, default=QUEUE_TIMEOUT_US, help="0 = no queue timeout")
    p.add_argument("--instances", type=int, default=INSTANCE_COUNT, help="model instances per model")
    p.add_argument("--cpu-threads", type=int, default=0, help="ONNX Runtime threads per instance (cpu; 0 = default)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from glipv2.checkpoint import CheckpointError

    args = parse_args(argv)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"{msg}  ({time.perf_counter() - t0:.1f} s)" if msg.startswith("[") else msg, flush=True)

    if args.out is None:
        args.out = default_repository(args.flavour)
    if not args.checkpoint.is_file():
        print(f"error: checkpoint {args.checkpoint} does not exist (train one with `make demo-model`)",
              file=sys.stderr)
        return 2
    settings = BatchingSettings(
        preferred_batch_sizes=args.preferred_batch_sizes, max_queue_delay_us=args.max_queue_delay_us,
        max_queue_size=args.max_queue_size, queue_timeout_us=args.queue_timeout_us,
        instance_count=args.instances, cpu_threads=args.cpu_threads, trt_cache_dir=args.trt_cache_dir,
    )
    try:
        if args.if_changed and repository_is_current(args.checkpoint, args.out, args.flavour, args.top_k,
                                                     args.max_batch_size, settings):
            print(f"{args.out} is up to date ({args.flavour}, checkpoint {args.checkpoint}): nothing to do")
            return 0
        out = render_repository(
            args.checkpoint, args.out, flavour=args.flavour, top_k=args.top_k,
            max_batch_size=args.max_batch_size, log=log, replace_flavour=args.force, image_hw=args.image_hw,
            settings=settings,
        )
    except (CheckpointError, SettingsError) as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    except RepositoryError as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 1
    print(f"wrote {out} ({args.flavour}) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
