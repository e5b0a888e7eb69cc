"""Image decoding with limits: JPEG, PNG and WebP from base64 or raw (multipart) bytes.

The pixel limit is checked on the header (PIL opens lazily) before any pixel data is
decoded, so a decompression bomb (a small file that inflates to gigapixels) costs
nothing. EXIF orientation is applied, so boxes refer to the image as it is displayed.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

__all__ = ["SUPPORTED_FORMATS", "decode_base64", "decode_image"]

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP")
_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)


def decode_base64(data: str, max_bytes: int | None = None) -> bytes:
    """Standard base64, optionally as a data URL ("data:image/png;base64,..."); 422 if malformed."""
    text = _DATA_URL.sub("", data.strip(), count=1)
    text = "".join(text.split())  # line-wrapped base64 (MIME style) is accepted
    if max_bytes is not None and len(text) * 3 // 4 > max_bytes:
        raise PayloadTooLarge(f"image is larger than {max_bytes} bytes", limit=max_bytes)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"image is not valid base64: {exc}") from None
    if not raw:
        raise InvalidInput("image is empty")
    return raw


def decode_image(raw: bytes, max_pixels: int) -> np.ndarray:
    """Bytes -> uint8 [H, W, 3] RGB, orientation applied. 415 for other formats, 413 over
    max_pixels (checked before decoding), 422 for a corrupt file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        raise UnsupportedMediaType(
            f"image format not supported: send one of {', '.join(SUPPORTED_FORMATS)}"
        ) from None
    except Image.DecompressionBombError:
        raise PayloadTooLarge(f"image has more than {max_pixels} pixels", limit=max_pixels) from None
    except OSError as exc:
        raise InvalidInput(f"image cannot be read: {exc}") from None
    with img:
        w, h = img.size
        if w <= 0 or h <= 0:
            raise InvalidInput(f"image has no pixels ({w}x{h})")
        if w * h > max_pixels:
            raise PayloadTooLarge(
                f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}", limit=max_pixels
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img.load()  # first frame of animated PNG / WebP
                oriented = ImageOps.exif_transpose(img)
                rgb = oriented.convert("RGB")
        except Image.DecompressionBombError:
            raise PayloadTooLarge(f"image has more than {max_pixels} pixels", limit=max_pixels) from None
        except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
            raise InvalidInput(f"image cannot be decoded: {exc}") from None
    return np.asarray(rgb, dtype=np.uint8)
