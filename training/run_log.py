"""What a training run writes as it goes: a tqdm bar, metrics.jsonl, TensorBoard events,
and curves.png (loss and AP against steps). Only the main process writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm


class RunLog:
    def __init__(self, out_dir: Path, enabled: bool, resumed_at: int = 0) -> None:
        self.enabled = enabled
        self.out_dir = out_dir
        self.writer = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = out_dir / "metrics.jsonl"
        if resumed_at:
            self._truncate_after(resumed_at)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resumed_at or None)
        except ImportError:  # tensorboard is optional at run time
            self.writer = None

    def _truncate_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop their old records."""
        if not self.jsonl.exists():
            return
        kept = [line for line in self.jsonl.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.jsonl.write_text("".join(line + "\n" for line in kept))

    def progress(self, total: int, initial: int) -> tqdm:
        return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not self.enabled,
                    dynamic_ncols=True, mininterval=2.0)

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")

    def train(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._append({"kind": "train", **record})
        if self.writer:
            for k, v in record.items():
                if k != "step":
                    self.writer.add_scalar(f"train/{k}", v, record["step"])

    def eval(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self._append({"kind": "eval", "step": step, **numbers})
        if self.writer:
            for k, v in numbers.items():
                self.writer.add_scalar(f"eval/{k}", v, step)
        self.plot()

    def plot(self) -> None:
        """curves.png: training loss (left) and evaluation AP (right) against step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line]
        train = [r for r in records if r["kind"] == "train"]
        evals = [r for r in records if r["kind"] == "eval"]
        fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
        for key in ("total", "grounding", "box_giou", "box_refine", "centerness", "contrastive", "mlm"):
            pts = [(r["step"], r[key]) for r in train if key in r]
            if pts:
                ax_loss.plot(*zip(*pts), label=key)
        ax_loss.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
        ax_loss.legend(fontsize=8)
        for key in ("shape_ap50", "shape_ap", "colour_ap50", "recall@1"):
            pts = [(r["step"], r[key]) for r in evals if key in r]
            if pts:
                ax_ap.plot(*zip(*pts), marker="o", label=key)
        ax_ap.set(xlabel="step", ylim=(0, 1), title="validation")
        if evals:
            ax_ap.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(self.out_dir / "curves.png", dpi=90)
        plt.close(fig)

    def close(self) -> None:
        if self.enabled:
            if self.writer:
                self.writer.close()
            if self.jsonl.exists():
                self.plot()
