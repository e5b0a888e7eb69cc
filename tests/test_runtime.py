"""glipv2.runtime: the torch-free contract between export and serving (manifest, graph
signatures, the ONNX Runtime engine, the one batch assembly)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from glipv2.runtime.manifest import FORMAT, Manifest, ManifestError

ROOT = Path(__file__).resolve().parents[1]
REPO = ROOT / "model_repository"
FORBIDDEN = ("torch", "export", "training")


def _imports(path: Path) -> set[str]:
    """Top-level package of every import in a file, lazy (in-function) imports included."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", ["service", "glipv2/runtime"])
def test_serving_code_never_imports_torch_export_or_training(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    bad = {str(f.relative_to(ROOT)): sorted(_imports(f) & set(FORBIDDEN)) for f in files}
    assert not {f: m for f, m in bad.items() if m}


def test_gateway_process_loads_no_torch():
    """Importing every service module (and building the app) pulls in none of them."""
    code = ("import sys, pkgutil, importlib, service\n"
            "for m in pkgutil.walk_packages(service.__path__, 'service.'):\n"
            "    importlib.import_module(m.name)\n"
            "import glipv2.runtime.onnx, glipv2.runtime.pipeline\n"
            "from service.app import create_app; create_app()\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_committed_manifest_round_trips():
    text = (REPO / "manifest.json").read_text()
    m = Manifest.load(REPO)
    assert m.format == FORMAT and m.image_hw == tuple(json.loads(text)["image"]["hw"])
    assert m.dumps() == text  # the class writes exactly what it reads
    assert m.caption is not None and m.caption.max_positions == m.caption.max_len + 1
    assert list(m.models["detector"].inputs) == ["images", "token_features", "attention_mask"]


@pytest.mark.parametrize("change, match", [
    (lambda d: d.update(format="glipv2-serve-repository/0"), "format"),
    (lambda d: d.update(image_size=d.pop("image")), "missing 'image'"),  # a renamed key fails at load
    (lambda d: d.update(extra_key=1), "unknown 'extra_key'"),
    (lambda d: d["models"]["detector"].pop("outputs"), r"models.detector: missing 'outputs'"),
    (lambda d: d.update(top_k="100"), "top_k must be an integer"),
    (lambda d: d["postprocess"].update(nms_iou=2.0), "postprocess"),
    (lambda d: d["postprocess"].update(threshold_on="logit"), "threshold_on"),
    # format 2: the official preprocessing is part of the layout
    (lambda d: d.update(format="glipv2-serve-repository/1") or d["image"].pop("max_side"), "expected .*/2"),
    (lambda d: d["image"].pop("normalisation"), "manifest.image: missing 'normalisation'"),
    (lambda d: d["image"].update(pad_value=[104, 117]), "pad_value must be one value or 3"),
    (lambda d: d["image"].update(pad_value=300), "pad_value must be one value or 3"),
    (lambda d: d["image"].update(max_side=-1), "max_side must be an integer >= 0"),
    (lambda d: d["image"]["normalisation"].update(channel_order="GBR"), "channel_order"),
    (lambda d: d["image"]["normalisation"].update(std=[1, 0, 1]), "std must be positive"),
    (lambda d: d["caption"].update(words="a red square"), "caption.words must be a list"),
    (lambda d: d["caption"].update(words=["red", ""]), "caption.words must be a list of non-empty strings"),
    (lambda d: d["caption"].update(checked_phrases="red circle"), "caption.checked_phrases must be a list"),
    (lambda d: d["caption"].update(check_threshold=1.5), r"check_threshold must be in \(0, 1\)"),
    (lambda d: d["caption"].update(check_threshold="0.4"), "check_threshold must be a number"),
])
def test_bad_manifests_fail_when_read(tmp_path, change, match):
    d = json.loads((REPO / "manifest.json").read_text())
    change(d)
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=match):
        Manifest.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="make export"):
        Manifest.load(tmp_path / "nowhere")


def test_a_manifest_without_caption_words_decodes_without_the_word_rule():
    """Repositories rendered before caption words existed still load (any word may end)."""
    d = json.loads((REPO / "manifest.json").read_text())
    assert d["caption"]["words"]
    d["caption"].pop("words")
    assert Manifest.from_dict(d).caption.words == ()


def test_a_manifest_without_checked_phrases_captions_unchecked():
    """Repositories rendered before the caption check existed still load, and check nothing."""
    d = json.loads((REPO / "manifest.json").read_text())
    assert len(d["caption"]["checked_phrases"]) == 36 and Manifest.from_dict(d).caption_check().score_threshold == 0.4
    d["caption"].pop("checked_phrases")
    d["caption"].pop("check_threshold")
    m = Manifest.from_dict(d)
    assert m.caption.checked_phrases == () and m.caption_check() is None


def test_official_image_layout_round_trips():
    """A repository of official GLIP weights: BGR normalisation, per-channel mean padding,
    the 1333 long-side cap, the probability threshold rule."""
    d = json.loads((REPO / "manifest.json").read_text())
    d["image"].update(pad_value=[124, 116, 104], max_side=1333,
                      normalisation={"mean": [103.53, 116.28, 123.675], "std": [57.375, 57.12, 58.395],
                                     "channel_order": "BGR", "scale": "0-255"})
    d["postprocess"]["threshold_on"] = "probability"
    m = Manifest.from_dict(d)
    assert m.image.pad_value == (124, 116, 104) and m.image.max_side == 1333
    assert m.image.normalisation.channel_order == "BGR" and m.image.normalisation.std[0] == 57.375
    assert m.postprocess.threshold_on == "probability"
    assert m.to_dict() == d and Manifest.from_dict(m.to_dict()) == m


def test_postprocess_overrides():
    m = Manifest.load(REPO)
    pp = m.postprocess_with(score_threshold=0.3, max_detections=7)
    assert (pp.score_threshold, pp.max_detections, pp.nms_iou) == (0.3, 7, m.postprocess.nms_iou)
    assert m.postprocess_with() == m.postprocess


def test_export_writes_the_manifest_through_the_class():
    export_repository = pytest.importorskip("export.repository")  # imports torch
    from glipv2.checkpoint import load_model

    model, ckpt = load_model(ROOT / "demo" / "tiny.pt")
    m = export_repository.manifest_of(model.cfg, ROOT / "demo" / "tiny.pt", ckpt, "cpu", 100, 8)
    assert isinstance(m, Manifest) and Manifest.from_dict(m.to_dict()) == m


def test_parity_path_is_the_gateway_path():
    """DetectionPipeline (evaluation, export parity) and the embedded backend give the same
    detections: both are glipv2.runtime.batch.BatchRunner over the same engine."""
    from glipv2.image import letterbox
    from glipv2.runtime.batch import BatchItem, BatchRunner
    from glipv2.runtime.pipeline import DetectionPipeline
    from glipv2.text import build_prompt
    from service.backends.embedded import EmbeddedBackend

    backend = EmbeddedBackend(REPO, cache_size=16, threads=1)
    assert type(backend).run_batch is BatchRunner.run_batch
    # the served settings at a low threshold: relation phrases scored by their head, as served
    pipe = DetectionPipeline(backend.engine, backend.image_hw, backend.tokenizer,
                             backend.manifest.postprocess_with(0.05))
    assert pipe.postprocess.phrase_tokens == "head"
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (90 + 30 * i, 120, 3), dtype=np.uint8) for i in range(3)]
    prompts = ["circle. square.", "the red star left of the blue hexagon. cross.", "circle. square."]
    ours = pipe.predict(images, [build_prompt(p) for p in prompts])
    items = []
    for im, p in zip(images, prompts):
        pixels, lb = letterbox(im, backend.image_hw)
        items.append(BatchItem(pixels, lb, backend.tokenize(p), pipe.postprocess))
    theirs = backend.run_batch(items)
    assert (ours[1].phrase_ids == 0).any()  # the relation phrase has candidates to compare
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(a.phrase_ids, b.phrase_ids)
    assert backend.stats()["cache_hits"] == 1  # the repeated prompt
