"""The `glipv2` CLI: `glipv2 detect` on a freshly generated shapes image (in-process via
main(argv) and once through the installed console script), the drawn --out image, error
exit codes, and `glipv2 serve` argument handling."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glipv2.boxes import box_iou
from service.cli import draw_detections, main
from training.shapes_world import SHAPES, render, sample_scene

REPO = Path(__file__).resolve().parents[1] / "model_repository"
needs_onnx = pytest.mark.skipif(
    not all((REPO / m / "1" / "model.onnx").is_file() for m in ("text_encoder", "detector")),
    reason="model_repository has no ONNX files: run `make export`",
)
PROMPT = ". ".join(SHAPES) + "."


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory):
    """A shapes scene with at least 3 objects, as PNG, and its objects."""
    rng = np.random.default_rng(2024)
    while True:
        scene = sample_scene(rng)
        if len(scene.objects) >= 3:
            break
    path = tmp_path_factory.mktemp("cli") / "scene.png"
    Image.fromarray(render(scene, rng)).save(path)
    return path, scene


def _recall(detections, scene) -> float:
    found = 0
    for obj in scene.objects:
        boxes = np.array([d["box"] for d in detections if d["phrase"] == obj.shape], np.float32).reshape(-1, 4)
        found += bool(len(boxes) and box_iou(np.array([obj.box], np.float32), boxes).max() > 0.5)
    return found / len(scene.objects)


@needs_onnx
def test_detect_json_finds_objects_and_draws(scene_png, tmp_path, capsys):
    path, scene = scene_png
    out = tmp_path / "boxes.png"
    rc = main(["detect", str(path), "--prompt", PROMPT, "--repository", str(REPO), "--json", "--out", str(out),
               "--threshold", "0.3", "--threads", "2"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert (result["width"], result["height"]) == (img.shape[1], img.shape[0])
    assert result["phrases"] == list(SHAPES) and result["out"] == str(out)
    assert all(d["score"] >= 0.3 for d in result["detections"])
    assert _recall(result["detections"], scene) >= 0.66, result["detections"]

    drawn = np.asarray(Image.open(out).convert("RGB"))
    assert drawn.shape == img.shape
    changed = np.any(drawn != img, axis=2)
    for d in result["detections"]:
        x0, y0, x1, y1 = (int(round(v)) for v in d["box"])
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, img.shape[1] - 1), min(y1, img.shape[0] - 1)
        # every side of the box was drawn over
        for edge in (changed[y0:y1 + 1, x0], changed[y0:y1 + 1, x1], changed[y0, x0:x1 + 1], changed[y1, x0:x1 + 1]):
            assert edge.mean() > 0.5
    far = ~np.zeros_like(changed)
    for d in result["detections"]:
        x0, y0, x1, y1 = d["box"]
        far[max(int(y0) - 30, 0):int(y1) + 5, max(int(x0) - 5, 0):int(x1) + 150] = False
    assert not changed[far].any()  # nothing drawn away from the boxes and labels


@needs_onnx
def test_detect_table(scene_png, capsys):
    path, scene = scene_png
    assert main(["detect", str(path), "-p", PROMPT, "-r", str(REPO)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: ") and "phrase" in out and "score" in out
    assert any(obj.shape in out for obj in scene.objects)


@needs_onnx
def test_console_script(scene_png, tmp_path):
    exe = shutil.which("glipv2", path=str(Path(sys.executable).parent))
    assert exe, "console script glipv2 not installed: pip install -e ."
    path, scene = scene_png
    out = tmp_path / "drawn.png"
    proc = subprocess.run([exe, "detect", str(path), "--prompt", PROMPT, "--repository", str(REPO),
                           "--out", str(out), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert _recall(result["detections"], scene) >= 0.66
    assert out.is_file() and Image.open(out).format == "PNG"
    proc = subprocess.run([exe, "detect", str(tmp_path / "missing.png"), "--prompt", "star"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no such image file" in proc.stderr


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("glipv2: error: ")
    return err


def test_errors(scene_png, tmp_path, capsys):
    path, _ = scene_png
    assert "no such image file" in _error(capsys, ["detect", str(tmp_path / "nope.png"), "-p", "star", "-r", str(REPO)])
    gif = tmp_path / "x.gif"
    Image.new("RGB", (8, 8)).save(gif)
    assert "format GIF not supported" in _error(capsys, ["detect", str(gif), "-p", "star", "-r", str(REPO)])
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    assert "not an image" in _error(capsys, ["detect", str(junk), "-p", "star", "-r", str(REPO)])
    assert "prompt is empty" in _error(capsys, ["detect", str(path), "-p", "  ", "-r", str(REPO)])
    assert "not a model repository" in _error(capsys, ["detect", str(path), "-p", "star", "-r", str(tmp_path)])
    assert "--threshold" in _error(capsys, ["detect", str(path), "-p", "star", "--threshold", "2"])
    assert "--out" in _error(capsys, ["detect", str(path), "-p", "star", "--out", str(tmp_path / "a.txt")])
    assert "not a model repository" in _error(capsys, ["serve", "--repository", str(tmp_path)])
    # a fresh clone: manifest and configs (in git) but no generated files
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(REPO / "manifest.json", fresh / "manifest.json")
    for argv in (["detect", str(path), "-p", "star", "-r", str(fresh)], ["serve", "--repository", str(fresh)],
                 ["vqa", str(path), "-q", "what color is the star?", "-r", str(fresh)]):
        err = _error(capsys, argv)
        assert "not exported yet" in err and "tokenizer.json" in err and "detector/1/model.onnx" in err, err
        assert "make export" in err and "CHECKPOINT=" in err and "os error" not in err, err
    with pytest.raises(SystemExit) as exc:  # argparse: missing --prompt
        main(["detect", str(path)])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


@needs_onnx
def test_prompt_over_token_limit(scene_png, capsys):
    path, _ = scene_png
    err = _error(capsys, ["detect", str(path), "-p", ". ".join(["red circle"] * 200), "-r", str(REPO)])
    assert "tokens" in err


def test_draw_detections_labels():
    img = np.full((100, 120, 3), 255, np.uint8)
    drawn = np.asarray(draw_detections(img, [{"box": [20, 30, 80, 90], "score": 0.9, "phrase": "star",
                                               "phrase_index": 0}]))
    assert (drawn[30:91, 20] != 255).any(axis=1).all()  # left edge
    assert (drawn[12:30, 20:60] != 255).any()  # label above the box
    assert (drawn[50:70, 40:60] == 255).all()  # inside untouched


@needs_onnx
def test_vqa_and_caption_commands(scene_png, capsys):
    path, scene = scene_png
    shape = scene.objects[0].shape
    plural = {"cross": "crosses"}.get(shape, shape + "s")
    assert main(["vqa", str(path), "-q", f"how many {plural} are there?", "-r", str(REPO), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answer"] == str(sum(o.shape == shape for o in scene.objects))
    assert len(out["top_answers"]) == 5
    assert main(["caption", str(path), "-r", str(REPO), "--beam-size", "2"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{path}: ") and any(o.shape in text for o in scene.objects)
    assert main(["caption", str(path), "-r", str(REPO), "--grounded", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["phrases"] and all(out["caption"][p["span"][0]:p["span"][1]] == p["phrase"] for p in out["phrases"])
    assert any(p["box"] is not None for p in out["phrases"]) and out["checked"] is True
    assert main(["caption", str(path), "-r", str(REPO), "--unchecked", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checked"] is False
    assert "question is empty" in _error(capsys, ["vqa", str(path), "-q", " ", "-r", str(REPO)])
    assert "tokens" in _error(capsys, ["vqa", str(path), "-q", "why " * 300, "-r", str(REPO)])
    assert "--beam-size" in _error(capsys, ["caption", str(path), "--beam-size", "9", "-r", str(REPO)])
    assert "--max-len" in _error(capsys, ["caption", str(path), "--max-len", "500", "-r", str(REPO)])
