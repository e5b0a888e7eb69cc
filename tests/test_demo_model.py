"""The committed demo model still detects: evaluated on freshly generated images."""

from pathlib import Path

import pytest

from glipv2.checkpoint import load_model
from glipv2.predict import TorchPredictor
from training.evaluate import evaluate_detection
from training.generate import generate

DEMO = Path(__file__).resolve().parents[1] / "demo" / "tiny.pt"


@pytest.mark.skipif(not DEMO.exists(), reason="demo/tiny.pt missing: run `make demo-model`")
def test_demo_model_on_a_fresh_split(tmp_path):
    # seed 99: images the model never saw, and not the val split its numbers are reported on
    generate(tmp_path / "split", split="val", num_images=40, seed=99, progress=False)
    model, ckpt = load_model(DEMO, preset="tiny")
    metrics = evaluate_detection(TorchPredictor(model).predict, tmp_path / "split", progress=False)
    # measured on the 500-image val split: shape AP50 0.99, colour AP50 0.58 (README);
    # the bounds leave room for a 40-image sample
    assert metrics["shape_ap50"] >= 0.9, metrics
    assert metrics["colour_ap50"] >= 0.4, metrics
    assert metrics["recall@1/colour"] >= 0.6, metrics
