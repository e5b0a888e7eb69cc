"""Strip a training checkpoint down to what serving needs: model config and weights.

`python -m training.release --checkpoint runs/demo/best.pt --out demo/tiny.pt` drops the
optimizer, scheduler and RNG state (three quarters of the file), keeps the step and the
evaluation metrics for provenance, and verifies the result loads.

`--serving token_aggregation=geometric` also changes a setting that only serving reads
(SERVING_FIELDS: how detections are scored from the same outputs, which whole words a
caption may use, which phrases a caption names only where the detector finds them), never
one the weights depend on.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from glipv2.checkpoint import FORMAT, CheckpointError, atomic_save, load_model, read_checkpoint
from glipv2.config import SERVING_FIELDS, ModelConfig
from training.train import field_values


def release(checkpoint: str, out: str, serving: dict[str, Any] | None = None) -> dict:
    ckpt = read_checkpoint(checkpoint)
    other = sorted(set(serving or {}) - set(SERVING_FIELDS))
    if other:
        raise CheckpointError(f"--serving can change only {', '.join(SERVING_FIELDS)}, not {', '.join(other)} "
                              "(the weights were trained for the rest)")
    model_config = {**ckpt["model_config"], **(serving or {})}
    try:
        ModelConfig.from_dict(model_config)
    except ValueError as e:
        raise CheckpointError(f"--serving: {e}") from e
    slim = {
        "format": FORMAT,
        "model_config": model_config,
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
    p.add_argument("--serving", action="append", default=[], metavar="KEY=VALUE",
                   help=f"set a serving-only model setting ({', '.join(SERVING_FIELDS)}); repeatable")
    args = p.parse_args(argv)
    try:
        serving = field_values(args.serving, "--serving")
    except ValueError as e:
        p.error(str(e))
    try:
        slim = release(args.checkpoint, args.out, serving)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (step {slim['step']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
