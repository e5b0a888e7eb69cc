"""Photometric augmentation for uint8 HxWx3 RGB images (numpy + PIL).

Only photometric: a horizontal flip would turn "left of" into "right of", and crops or
rescales would have to move the boxes, so geometry is left to the model's letterbox.
Jitter is kept small so an object's colour stays inside its name ("red" stays red).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

P_JPEG, P_BLUR, P_NOISE, P_JITTER = 0.4, 0.2, 0.3, 0.5
_NORMAL_TABLE = np.sort(np.random.default_rng(0).standard_normal(4096)).astype(np.float32)


def jpeg_reencode(image: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def gaussian_blur(image: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Randomly (each with its own probability): brightness/contrast jitter, Gaussian
    blur, additive Gaussian noise, JPEG re-encode at quality 30..95. Returns a new uint8
    array of the same shape; deterministic given rng."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"augment expects uint8 HxWx3, got {image.dtype} {image.shape}")
    out = image
    if rng.random() < P_JITTER:
        contrast = rng.uniform(0.88, 1.12)
        brightness = rng.uniform(-12, 12)
        mean = float(out[::4, ::4].mean())  # a subsampled mean is plenty for the pivot
        # an affine map of grey levels: apply it through a 256-entry table (fast)
        levels = np.arange(256, dtype=np.float32)
        lut = np.clip((levels - mean) * contrast + mean + brightness + 0.5, 0, 255).astype(np.uint8)
        out = lut[out]
    if rng.random() < P_BLUR:
        out = gaussian_blur(out, float(rng.uniform(0.3, 1.2)))
    if rng.random() < P_NOISE:
        sigma = float(rng.uniform(2, 7))
        # Gaussian noise via a table of normal quantiles indexed by random integers: the
        # same distribution (quantised) as standard_normal at a fraction of its cost
        table = np.rint(_NORMAL_TABLE * sigma).astype(np.int16)
        noise = table[rng.integers(0, _NORMAL_TABLE.size, out.shape, dtype=np.uint16)]
        out = np.clip(out.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    if rng.random() < P_JPEG:
        out = jpeg_reencode(out, int(rng.integers(30, 96)))
    return out if out is not image else image.copy()
