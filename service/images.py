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
import ipaddress
import logging
import re
import socket
import ssl
import struct
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from glipv2.boxes import Letterbox
from glipv2.image import PAD_VALUE, letterbox
from service.errors import InvalidInput, PayloadTooLarge, ServiceError, UnsupportedMediaType

__all__ = ["SUPPORTED_FORMATS", "ImageURL", "URLNotAllowed", "decode_base64", "decode_image", "decode_letterboxed",
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


# Signatures of image formats the gateway does not take, so that a GIF is told "GIF not
# supported" while a text file named .jpg is told "not an image". Magic bytes only: no
# other decoder ever sees the data.
_OTHER_FORMATS = ((b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"),
                  (b"\0\0\1\0", "ICO"), (b"8BPS", "PSD"), (b"\0\0\0\x0cjP  ", "JPEG 2000"), (b"qoif", "QOI"))


def _other_image_format(raw: bytes) -> str | None:
    for magic, name in _OTHER_FORMATS:
        if raw.startswith(magic):
            return name
    if raw[4:8] == b"ftyp" and raw[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1"):
        return "AVIF/HEIC"
    head = raw[:256].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in raw[:4096].lower()):
        return "SVG"
    return None


# What PIL's format plugins raise on truncated or corrupt data: not only OSError (a
# truncated PNG IHDR or APNG chunk raises ValueError, others struct.error, EOFError,
# IndexError, SyntaxError). All of them are the caller's bad input: 422, never a 500.
_CORRUPT = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error)


def decode_image(raw: bytes, max_pixels: int) -> np.ndarray:
    """Bytes -> uint8 [H, W, 3] RGB, orientation applied. 415 for other formats, 413 over
    max_pixels (checked before decoding), 422 for a corrupt file."""
    return np.asarray(_decode(raw, max_pixels)[0], dtype=np.uint8)


def decode_letterboxed(raw: bytes, max_pixels: int, target_hw: tuple[int, int],
                       pad_value: int | Sequence[int] = PAD_VALUE, max_side: int = 0,
                       ) -> tuple[np.ndarray, Letterbox, tuple[int, int]]:
    """Bytes -> (uint8 [3, th, tw] letterboxed into target_hw, its Letterbox to original
    pixels, original (width, height) as displayed). Same errors and limits as decode_image.
    pad_value and max_side: the manifest's image layout (glipv2.image.letterbox).

    A JPEG is decoded at the smallest DCT scale (1/2, 1/4 or 1/8, Pillow's draft mode) that
    still covers the letterboxed size, then resized the rest of the way: the model never
    sees more than target_hw, so decoding all 12 megapixels of a phone photo was wasted."""
    rgb, (w, h) = _decode(raw, max_pixels, target_hw, max_side)
    pixels, lb = letterbox(rgb, target_hw, pad_value, orig_hw=(h, w), max_side=max_side)
    return pixels, lb, (w, h)


# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPS_AXES = (5, 6, 7, 8)


def _draft(img: Image.Image, target_hw: tuple[int, int], max_side: int = 0) -> tuple[int, int]:
    """Ask the JPEG decoder for the smallest DCT scale whose output still covers what the
    letterbox keeps of the displayed image; returns the displayed (width, height) of the
    full-size image (what boxes refer to)."""
    w, h = img.size
    swap = img.getexif().get(0x0112, 1) in _SWAPS_AXES
    dw, dh = (h, w) if swap else (w, h)
    rh, rw = Letterbox.fit((dh, dw), target_hw, max_side).resized_hw
    img.draft("RGB", (rh, rw) if swap else (rw, rh))  # in stored orientation; >= the size asked for
    return dw, dh


def _decode(raw: bytes, max_pixels: int, fit_hw: tuple[int, int] | None = None, max_side: int = 0
            ) -> tuple[Image.Image, tuple[int, int]]:
    """(RGB image, orientation applied; its full-size displayed (width, height)). With
    fit_hw, a JPEG may come back smaller (draft mode, see decode_letterboxed)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        other = _other_image_format(raw)
        what = f"image format {other} not supported" if other else "not an image (no JPEG, PNG or WebP signature)"
        raise UnsupportedMediaType(f"{what}: send one of {', '.join(SUPPORTED_FORMATS)}") from None
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
                size = _draft(img, fit_hw, max_side) if fit_hw and img.format == "JPEG" else None
                img.load()  # first frame of animated PNG / WebP
                oriented = ImageOps.exif_transpose(img)
                rgb = oriented.convert("RGB")
        except Image.DecompressionBombError:
            raise PayloadTooLarge(f"image has more than {max_pixels} pixels", limit=max_pixels) from None
        except _CORRUPT as exc:  # truncated or corrupt data
            raise InvalidInput(f"image cannot be decoded: {exc}") from None
    return rgb, size or rgb.size


# ------------------------------------------------------------------------ image URLs


class URLNotAllowed(ServiceError):
    """The URL (or a redirect's) is not on GLIPV2_URL_ALLOWLIST, or its host resolves to a
    non-public address."""

    status_code = 403


@dataclass(frozen=True)
class ImageURL:
    """An image given by URL in a request (fetched in the fetch pool, then decoded)."""

    url: str


_CHUNK = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}
# One answer for every failure to fetch (refused, reset, timed out, TLS, any HTTP status):
# distinct messages let a caller map which hosts and ports answer (the log has the cause).
UNFETCHABLE = "image URL could not be fetched"
NOT_ALLOWED = "image URL is not on the allow-list (or its host resolves to a non-public address)"

log = logging.getLogger("service")


def parse_allowlist(value: str | None) -> tuple[str, ...]:
    """'a.example.com, https://cdn.example.com/pub/' -> its entries (empty: URLs disabled)."""
    return tuple(e.strip() for e in (value or "").split(",") if e.strip())


def _origin(parts: SplitResult) -> tuple[str, str, int]:
    """(scheme, host, port) with the scheme's default port filled in; ValueError for a bad port."""
    return parts.scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)


def _safe_path(path: str) -> str | None:
    """The path, once percent-decoded, when no segment can climb out of a prefix; None for
    '.', '..' (also '%2e%2e', '..;x'), encoded or back slashes, and double encoding."""
    decoded = unquote(path)
    lowered = decoded.lower()
    if "\\" in decoded or "%2f" in path.lower() or "%5c" in path.lower() or "%2e" in lowered or "%25" in path:
        return None
    if any(seg.split(";", 1)[0] in (".", "..") for seg in decoded.split("/")):
        return None
    return decoded


def url_allowed(url: str, allowlist: tuple[str, ...]) -> bool:
    """An entry with '://' is a URL prefix: same scheme, host and port, and the URL's path
    (percent-decoded; any '.' or '..' segment refuses it) starts with the entry's at a
    segment boundary, so 'http://a.com/pub/' admits neither '/pub/../private' nor
    '/pub/%2e%2e/private' nor 'http://a.com.evil.net'. Any other entry is a host ('a.com':
    the scheme's default port only) or host:port."""
    try:
        parts = urlsplit(url)
        scheme, host, port = _origin(parts)
    except ValueError:
        return False
    if scheme not in _DEFAULT_PORTS or not host:
        return False
    if parts.username is not None or parts.password is not None:
        return False  # credentials in URLs are never sent
    path = _safe_path(parts.path or "/")
    if path is None:
        return False
    for entry in allowlist:
        if "://" in entry:
            try:
                e = urlsplit(entry)
                if _origin(e) != (scheme, host, port):
                    continue
            except ValueError:
                continue
            prefix = unquote(e.path or "/")
            if path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/") or (
                    prefix in ("", "/")):
                return True
        else:
            try:
                ep = urlsplit("//" + entry)
                e_host, e_port = (ep.hostname or "").lower(), ep.port
            except ValueError:
                continue
            if e_host == host and (e_port or _DEFAULT_PORTS[scheme]) == port:
                return True
    return False


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _resolve(host: str, port: int, allow_private: bool) -> str:
    """The address to connect to; every address the name resolves to must be public unless
    allow_private (the connection then goes to the address checked: no second lookup that
    a rebinding DNS server could answer differently)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise _Unfetchable(f"resolve {host}: {exc}") from None
    addresses = [info[4][0] for info in infos]
    if not addresses:
        raise _Unfetchable(f"resolve {host}: no address")
    if not allow_private:
        for a in addresses:
            if not _public(ipaddress.ip_address(a.split("%", 1)[0])):
                log.info("image URL host %s resolves to non-public %s: refused", host, a)
                raise URLNotAllowed(NOT_ALLOWED)
    return addresses[0]


class _Unfetchable(Exception):
    """Any failure to fetch; the caller sees only UNFETCHABLE, the log sees this."""


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the checked address; Host header (and TLS name) stay the URL's host."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _get(url: str, deadline: float, max_bytes: int, allow_private: bool) -> tuple[int, str | None, bytes]:
    """One GET of url within the deadline: (status, Location, body). A watchdog shuts the
    socket at the deadline, so a server that trickles headers or body (a few bytes every
    second: each read within the socket timeout) cannot hold the fetch past it."""
    parts = urlsplit(url)
    scheme, host, port = _origin(parts)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _Unfetchable("deadline")
    address = _resolve(host, port, allow_private)
    conn = (_PinnedHTTPS if scheme == "https" else _PinnedHTTP)(host, port, address, remaining)
    expired = threading.Event()

    def _expire() -> None:
        expired.set()
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    watchdog = threading.Timer(remaining, _expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", target, headers={"User-Agent": "glipv2-serve", "Accept": "image/*"})
        resp = conn.getresponse()
        if resp.status in (301, 302, 303, 307, 308) or resp.status >= 400:
            return resp.status, resp.getheader("Location"), b""
        length = resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            raise PayloadTooLarge(f"image at URL is {length} bytes; the limit is {max_bytes}", limit=max_bytes)
        buf = bytearray()
        while chunk := resp.read1(_CHUNK):
            buf += chunk
            if len(buf) > max_bytes:
                raise PayloadTooLarge(f"image at URL is larger than {max_bytes} bytes", limit=max_bytes)
            if expired.is_set():
                raise _Unfetchable("deadline")
        if expired.is_set():
            raise _Unfetchable("deadline")
        return resp.status, None, bytes(buf)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise _Unfetchable("deadline" if expired.is_set() else f"{type(exc).__name__}: {exc}") from None
    finally:
        watchdog.cancel()
        conn.close()


def fetch_url(url: str, allowlist: tuple[str, ...], *, max_bytes: int, timeout_s: float,
              max_redirects: int = 3, allow_private: bool = False) -> bytes:
    """GET an image URL, all of it (redirects included) within timeout_s: 422 when URL
    fetching is disabled (empty allow-list), the URL is not http(s) or the fetch fails
    (one message for every cause: connection, timeout, HTTP status >= 400); 403 when the
    URL is not on the allow-list, a redirect leaves the URL's scheme/host/port or the
    list, or the host resolves to a loopback/private/link-local/reserved address (unless
    allow_private); 413 as soon as more than max_bytes arrive (streamed, never read whole)."""
    if not allowlist:
        raise InvalidInput("fetching image URLs is disabled: send the image as base64 (the server has no "
                           "GLIPV2_URL_ALLOWLIST)")
    if urlsplit(url).scheme not in _DEFAULT_PORTS:
        raise InvalidInput("image URL must be http:// or https://")
    if not url_allowed(url, allowlist):
        raise URLNotAllowed(NOT_ALLOWED)
    deadline = time.monotonic() + timeout_s
    current = url
    try:
        for _ in range(max_redirects + 1):
            status, location, body = _get(current, deadline, max_bytes, allow_private)
            if status in (301, 302, 303, 307, 308):
                if not location:
                    raise _Unfetchable(f"HTTP {status} without a Location")
                target = urljoin(current, location)
                try:
                    same = _origin(urlsplit(current)) == _origin(urlsplit(target))
                except ValueError:
                    same = False
                if not same or not url_allowed(target, allowlist):
                    raise URLNotAllowed("image URL redirects to another host or outside the allow-list; "
                                        "redirects are not followed there")
                current = target
                continue
            if status >= 400:
                raise _Unfetchable(f"HTTP {status}")
            if not body:
                raise InvalidInput("image at URL is empty")
            return body
    except _Unfetchable as exc:
        log.info("image URL %s could not be fetched: %s", current, exc)
        raise InvalidInput(UNFETCHABLE) from None
    raise InvalidInput(f"image URL redirected more than {max_redirects} times")
