"""Image decoding with limits: JPEG, PNG and WebP from base64, raw (multipart) bytes or,
where an allow-list is configured, an http(s) URL (`fetch_url`).

The pixel limit is checked on the header (PIL opens lazily) before any pixel data is
decoded, so a decompression bomb (a small file that inflates to gigapixels) costs
nothing. EXIF orientation is applied, so boxes refer to the image as it is displayed.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import re
import struct
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import InvalidInput, PayloadTooLarge, ServiceError, UnsupportedMediaType

__all__ = ["SUPPORTED_FORMATS", "ImageURL", "URLNotAllowed", "decode_base64", "decode_image",
           "fetch_url", "parse_allowlist", "url_allowed"]

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


# What PIL's format plugins raise on truncated or corrupt data: not only OSError (a
# truncated PNG IHDR or APNG chunk raises ValueError, others struct.error, EOFError,
# IndexError, SyntaxError). All of them are the caller's bad input: 422, never a 500.
_CORRUPT = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error)


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
    except _CORRUPT as exc:  # e.g. ValueError "Truncated IHDR chunk" from a 28-byte PNG
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
        except _CORRUPT as exc:  # truncated or corrupt data
            raise InvalidInput(f"image cannot be decoded: {exc}") from None
    return np.asarray(rgb, dtype=np.uint8)


# ------------------------------------------------------------------------ image URLs


class URLNotAllowed(ServiceError):
    """The URL's host (or a redirect's) is not on GLIPV2_URL_ALLOWLIST."""

    status_code = 403


@dataclass(frozen=True)
class ImageURL:
    """An image given by URL in a request (fetched in the worker thread, then decoded)."""

    url: str


_CHUNK = 64 * 1024


def parse_allowlist(value: str | None) -> tuple[str, ...]:
    """'a.example.com, https://cdn.example.com/pub/' -> its entries (empty: URLs disabled)."""
    return tuple(e.strip() for e in (value or "").split(",") if e.strip())


def url_allowed(url: str, allowlist: tuple[str, ...]) -> bool:
    """An entry with '://' is a URL prefix: the URL must start with it, and the prefix must
    end at a path/query boundary (so 'http://a.com' does not admit 'http://a.com.evil.net'
    or 'http://a.com@evil.net'). Any other entry is a host ('a.com', any port) or host:port."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    host = parts.hostname.lower()
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    if parts.username is not None or parts.password is not None:
        return False  # credentials in URLs are never sent
    for entry in allowlist:
        if "://" in entry:
            if url.lower().startswith(entry.lower()) and (
                entry.endswith("/") or len(url) == len(entry) or url[len(entry)] in "/?#"
            ):
                return True
        elif entry.lower() in (host, netloc):
            return True
    return False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # fetch_url follows redirects itself, after checking them


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def _same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, (pa.hostname or "").lower(), pa.port) == (pb.scheme, (pb.hostname or "").lower(), pb.port)


def fetch_url(url: str, allowlist: tuple[str, ...], *, max_bytes: int, timeout_s: float,
              max_redirects: int = 3) -> bytes:
    """GET an image URL: 422 when URL fetching is disabled (empty allow-list), the URL is
    not http(s) or the fetch fails (connection, timeout, HTTP status >= 400); 403 when the
    host is not on the allow-list or a redirect leaves the URL's scheme/host/port; 413 as
    soon as more than max_bytes arrive (the body is streamed, never read whole)."""
    if not allowlist:
        raise InvalidInput("fetching image URLs is disabled: send the image as base64 (the server has no "
                           "GLIPV2_URL_ALLOWLIST)")
    if urlsplit(url).scheme not in ("http", "https"):
        raise InvalidInput("image URL must be http:// or https://")
    if not url_allowed(url, allowlist):
        raise URLNotAllowed(f"image URL host is not on the allow-list: {urlsplit(url).hostname}")
    current = url
    for _ in range(max_redirects + 1):
        req = urllib.request.Request(current, headers={"User-Agent": "glipv2-serve", "Accept": "image/*"})
        try:
            resp = _OPENER.open(req, timeout=timeout_s)
        except urllib.error.HTTPError as exc:
            if exc.code in (301, 302, 303, 307, 308):
                location = exc.headers.get("Location")
                exc.close()
                if not location:
                    raise InvalidInput(f"image URL answered {exc.code} without a Location") from None
                target = urljoin(current, location)
                if not _same_origin(current, target) or not url_allowed(target, allowlist):
                    raise URLNotAllowed("image URL redirects to another host or outside the allow-list; "
                                        "redirects are not followed there") from None
                current = target
                continue
            exc.close()
            raise InvalidInput(f"image URL could not be fetched: HTTP {exc.code}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise InvalidInput(f"image URL could not be fetched: {reason}") from None
        with resp:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise PayloadTooLarge(f"image at URL is {length} bytes; the limit is {max_bytes}", limit=max_bytes)
            buf = bytearray()
            try:
                while chunk := resp.read(_CHUNK):
                    buf += chunk
                    if len(buf) > max_bytes:
                        raise PayloadTooLarge(f"image at URL is larger than {max_bytes} bytes", limit=max_bytes)
            except (http.client.HTTPException, OSError, ValueError) as exc:  # timeout or reset mid-body
                raise InvalidInput(f"image URL could not be read: {exc}") from None
        if not buf:
            raise InvalidInput("image at URL is empty")
        return bytes(buf)
    raise InvalidInput(f"image URL redirected more than {max_redirects} times")
