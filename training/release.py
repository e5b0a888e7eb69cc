"""Strip a training checkpoint down to what serving needs: model config and weights.

`python -m training.release --checkpoint runs/demo/best.pt --out demo/tiny.pt` drops the
optimizer, scheduler and RNG state (three quarters of the file), keeps the step and the
evaluation metrics for provenance, and verifies the result loads.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from glipv2.checkpoint import FORMAT, CheckpointError, atomic_save, load_model, read_checkpoint


def release(checkpoint: str, out: str) -> dict:
    ckpt = read_checkpoint(checkpoint)
    slim = {
        "format": FORMAT,
        "model_config": ckpt["model_config"],
        "model": ckpt["model"],
        "step": ckpt.get("step"),
        "metrics": ckpt.get("metrics", {}),
        "train_config": ckpt.get("train_config", {}),
    }
    atomic_save(slim, out)
    load_model(out)  # refuse to leave behind a file that does not load
    return slim


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.release", description=__doc__)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        slim = release(args.checkpoint, args.out)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (step {slim['step']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
