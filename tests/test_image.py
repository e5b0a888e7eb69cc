"""Letterbox preprocessing with PIL + numpy."""

import numpy as np
import pytest
from PIL import Image

from glipv2.image import PAD_VALUE, letterbox, letterbox_batch


def test_letterbox_shape_padding_and_content():
    img = np.zeros((100, 200, 3), dtype=np.uint8)
    img[..., 0] = 200  # red
    img[..., 2] = 50
    out, lb = letterbox(img, (64, 64))
    assert out.shape == (3, 64, 64) and out.dtype == np.uint8
    assert lb.scale == pytest.approx(0.32) and lb.resized_hw == (32, 64)
    assert lb.orig_hw == (100, 200) and lb.target_hw == (64, 64)
    assert (out[:, 32:, :] == PAD_VALUE).all()  # padding at the bottom only
    assert (out[0, :32] == 200).all() and (out[1, :32] == 0).all() and (out[2, :32] == 50).all()


def test_letterbox_pads_right_for_tall_images():
    out, lb = letterbox(np.full((200, 100, 3), 7, np.uint8), (50, 50), pad_value=0)
    assert lb.resized_hw == (50, 25)
    assert (out[:, :, :25] == 7).all() and (out[:, :, 25:] == 0).all()


def test_letterbox_box_lands_where_to_input_says():
    img = np.zeros((300, 400, 3), dtype=np.uint8)
    box = np.array([[100, 60, 220, 180]], np.float32)  # x1 y1 x2 y2 in original pixels
    x1, y1, x2, y2 = box[0].astype(int)
    img[y1:y2, x1:x2] = 255
    out, lb = letterbox(img, (150, 150))
    ys, xs = np.nonzero(out[0] > 127)
    found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
    np.testing.assert_allclose(found, lb.to_input(box)[0], atol=1.0)
    np.testing.assert_allclose(lb.to_original(found[None]), box, atol=1.0 / lb.scale)


def test_letterbox_accepts_pil_any_mode_and_grey_arrays():
    grey = Image.fromarray(np.full((20, 40), 90, np.uint8))  # mode "L"
    out, _ = letterbox(grey, (40, 40))
    assert out.shape == (3, 40, 40) and (out[:, :20] == 90).all()
    rgba = Image.new("RGBA", (10, 10), (1, 2, 3, 255))
    out, _ = letterbox(rgba, (10, 10))
    assert out[:, 0, 0].tolist() == [1, 2, 3]
    out, _ = letterbox(np.full((4, 4), 5, np.uint8), (8, 8))
    assert (out == 5).all()


def test_letterbox_upscales_and_rejects_bad_arrays():
    out, lb = letterbox(np.full((10, 20, 3), 9, np.uint8), (100, 100))
    assert lb.scale == pytest.approx(5.0) and lb.resized_hw == (50, 100)
    assert (out[:, :50] == 9).all() and (out[:, 50:] == PAD_VALUE).all()
    with pytest.raises(ValueError):
        letterbox(np.zeros((10, 10, 3), np.float32), (8, 8))
    with pytest.raises(ValueError):
        letterbox(np.zeros((10, 10, 4), np.uint8), (8, 8))


def test_letterbox_batch():
    images = [np.zeros((30, 60, 3), np.uint8), Image.new("RGB", (20, 50))]
    batch, boxes = letterbox_batch(images, (32, 48))
    assert batch.shape == (2, 3, 32, 48) and batch.dtype == np.uint8
    assert [b.orig_hw for b in boxes] == [(30, 60), (50, 20)]
    empty, none = letterbox_batch([], (32, 48))
    assert empty.shape == (0, 3, 32, 48) and none == []
