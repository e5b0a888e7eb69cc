"""JPEG draft decoding (service.images.decode_letterboxed): a large JPEG is decoded at a
reduced DCT scale that still covers the model input, EXIF orientation applied, limits
kept, and boxes still come back in original pixels."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from glipv2.image import letterbox
from service.app import create_app
from service.errors import PayloadTooLarge
from service.images import _decode, decode_image, decode_letterboxed
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1] / "model_repository"
TARGET = (256, 256)


def _photo(w: int, h: int) -> Image.Image:
    """Gradients, discs and noise: JPEG-compresses like a photo, not like a flat card."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w]
    img = Image.fromarray(np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], -1).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(30):
        x0, y0, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(w // 30, w // 6))
        d.ellipse([x0, y0, x0 + r, y0 + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    noisy = np.asarray(img).astype(np.int16) + rng.integers(-10, 11, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def large() -> Image.Image:
    return _photo(2400, 1800)


def test_large_jpeg_decodes_at_reduced_scale(large):
    raw = _jpeg(large)
    small, size = _decode(raw, 10**8, TARGET)
    assert size == (2400, 1800)  # what boxes refer to
    assert small.size == (300, 225)  # 1/8 DCT scale: the smallest covering 256 x 192
    full, size_full = _decode(raw, 10**8)
    assert full.size == size_full == (2400, 1800)


@pytest.mark.parametrize("orientation", [1, 6, 3, 8])
def test_draft_matches_full_decode(large, orientation):
    """Same letterbox mapping and nearly the same pixels as decoding every pixel, with the
    EXIF orientation applied (a missed or wrong rotation differs by tens of grey levels)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    raw = _jpeg(large, exif=exif.tobytes())
    pixels, lb, size = decode_letterboxed(raw, 10**8, TARGET)
    ref, ref_lb = letterbox(decode_image(raw, 10**8), TARGET)
    assert size == ((1800, 2400) if orientation in (6, 8) else (2400, 1800))
    assert lb == ref_lb and lb.orig_hw == (size[1], size[0])
    assert pixels.shape == ref.shape
    assert np.abs(pixels.astype(int) - ref.astype(int)).mean() < 2.0


def test_draft_keeps_the_official_layout(large):
    """Official GLIP weights (manifest image.max_side, per-channel mean padding): the draft
    scale is chosen for the capped size, and the padding is the manifest's, not grey 114."""
    canvas, cap, pad = (200, 336), 333, (124, 116, 104)
    raw = _jpeg(large.resize((2400, 1200)))
    pixels, lb, _ = decode_letterboxed(raw, 10**8, canvas, pad, cap)
    ref, ref_lb = letterbox(decode_image(raw, 10**8), canvas, pad, max_side=cap)
    assert lb == ref_lb and lb.resized_hw == (167, 333)  # long side capped, not the canvas' 336
    assert _decode(raw, 10**8, canvas, cap)[0].size == (600, 300)  # 1/4 scale covers 333 x 166
    assert (pixels[:, 170:, :] == np.array(pad, np.uint8)[:, None, None]).all()
    assert np.abs(pixels.astype(int) - ref.astype(int)).mean() < 2.0


def test_small_and_non_jpeg_images_are_decoded_whole():
    img = _photo(300, 200)
    for raw in (_jpeg(img), _png(img)):
        pixels, lb, size = decode_letterboxed(raw, 10**6, TARGET)
        ref, ref_lb = letterbox(decode_image(raw, 10**6), TARGET)
        assert size == (300, 200) and lb == ref_lb
        np.testing.assert_array_equal(pixels, ref)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_pixel_limit_is_checked_on_the_full_size(large):
    """Draft decoding makes a big JPEG cheap, but the limit is still on its real size."""
    with pytest.raises(PayloadTooLarge):
        decode_letterboxed(_jpeg(large), 2400 * 1800 - 1, TARGET)


@pytest.mark.skipif(not (REPO / "detector" / "1" / "model.onnx").is_file(), reason="run `make export`")
def test_boxes_in_original_pixels_of_a_large_jpeg():
    """A scene scaled up 8x and sent as a large JPEG: the gateway's boxes are 8x those of
    the small image (within a few pixels of the small image's scale)."""
    from training.shapes_world import render, sample_scene

    rng = np.random.default_rng(3)
    scene = sample_scene(rng)
    small = Image.fromarray(render(scene, rng))
    big = small.resize((small.width * 8, small.height * 8), Image.BILINEAR)
    prompt = ". ".join(sorted({o.shape for o in scene.objects}))
    settings = Settings(repository=REPO, max_image_pixels=20_000_000, max_body_bytes=20_000_000, threads=2)
    with TestClient(create_app(settings)) as c:
        def detect(img: Image.Image) -> dict:
            data = base64.b64encode(_jpeg(img)).decode()
            r = c.post("/v1/detect", json={"images": [{"image": data, "prompt": prompt}], "score_threshold": 0.3})
            assert r.status_code == 200, r.text
            return r.json()["results"][0]

        a, b = detect(small), detect(big)
    assert (b["width"], b["height"]) == (small.width * 8, small.height * 8)
    confident = [d for d in a["detections"] if d["score"] >= 0.5]
    assert confident, "the demo model finds the scene's shapes"
    boxes_b = np.array([d["box"] for d in b["detections"]]) / 8
    for d in confident:  # each confident box of the small image is found again, 8x larger
        assert np.abs(boxes_b - np.array(d["box"])).max(axis=1).min() < 3.0, (d, boxes_b)


@pytest.mark.skipif(not (REPO / "detector" / "1" / "model.onnx").is_file(), reason="run `make export`")
def test_the_gateway_letterboxes_with_the_manifests_layout(tmp_path):
    """The app hands the manifest's pad_value and max_side to its image loader (what an
    official GLIP-T repository needs): the demo graphs under a manifest that asks for
    per-channel padding and a long-side cap."""
    import asyncio
    import json

    for entry in REPO.iterdir():
        if entry.name != "manifest.json":
            (tmp_path / entry.name).symlink_to(entry)
    manifest = json.loads((REPO / "manifest.json").read_text())
    manifest["image"].update(pad_value=[10, 20, 30], max_side=100)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with TestClient(create_app(Settings(repository=tmp_path, threads=1))) as c:
        (loaded,) = asyncio.run(c.app.state.loader.load([_png(_photo(300, 200))]))
    th, tw = manifest["image"]["hw"]
    assert loaded.letterbox.resized_hw == (67, 100) and loaded.pixels.shape == (3, th, tw)
    assert (loaded.pixels[:, 67:, :] == np.array([10, 20, 30], np.uint8)[:, None, None]).all()
    assert (loaded.pixels[:, :, 100:] == np.array([10, 20, 30], np.uint8)[:, None, None]).all()
