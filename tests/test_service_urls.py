"""Image URLs in JSON requests: refused (422) unless GLIPV2_URL_ALLOWLIST is set; allowed
hosts fetched from a local http.server on 127.0.0.1 serving generated PNGs (loopback is
refused unless GLIPV2_URL_ALLOW_PRIVATE, which these tests set); 403 for hosts off the
list, paths climbing out of an allowed prefix, other ports, non-public addresses and
redirects to another host; 413 past the byte (streamed) or pixel limit; 422, with one
message whatever the cause, for unfetchable URLs; an overall deadline against origins that
trickle bytes, in a pool of its own (readiness and base64 requests unaffected)."""

from __future__ import annotations

import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.errors import InvalidInput, PayloadTooLarge
from service.images import URLNotAllowed, fetch_url, parse_allowlist, url_allowed
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1] / "model_repository"
HAS_ONNX = all((REPO / m / "1" / "model.onnx").is_file() for m in ("text_encoder", "detector"))
MAX_BYTES = 200_000
MAX_PIXELS = 500_000


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def _scene():
    from training.shapes_world import render, sample_scene

    rng = np.random.default_rng(99)
    while True:
        scene = sample_scene(rng)
        if scene.width * scene.height <= MAX_PIXELS and len(scene.objects) >= 2:
            img = render(scene, rng, edges=False)
            data = _png(img)
            if len(data) < MAX_BYTES:
                return scene, img, data


SCENE, SCENE_IMG, SCENE_PNG = _scene()
NOISE_PNG = _png(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8))  # ~480 KB
assert len(NOISE_PNG) > MAX_BYTES
HUGE_PIXELS_PNG = _png(np.zeros((1000, 1000, 3), np.uint8))  # small file, 1 Mpx
assert len(HUGE_PIXELS_PNG) < MAX_BYTES


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    requests: list[str] = []

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None, length: bool = True):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        _Handler.requests.append(self.path)
        port = self.server.server_address[1]
        if self.path == "/img/scene.png":
            self._send(200, SCENE_PNG, {"Content-Type": "image/png"})
        elif self.path == "/img/big.png":  # declared length over the limit
            self._send(200, NOISE_PNG, {"Content-Type": "image/png"})
        elif self.path == "/img/stream.png":  # no Content-Length: must be cut off while streaming
            self._send(200, headers={"Content-Type": "image/png"}, length=False)
            try:
                for i in range(0, 50 * len(NOISE_PNG), 16384):
                    self.wfile.write(NOISE_PNG[i % len(NOISE_PNG):][:16384] or b"\0" * 16384)
            except (BrokenPipeError, ConnectionResetError):
                pass
        elif self.path == "/img/pixels.png":
            self._send(200, HUGE_PIXELS_PNG, {"Content-Type": "image/png"})
        elif self.path == "/img/text":
            self._send(200, b"hello, not an image", {"Content-Type": "text/plain"})
        elif self.path == "/img/same-host-redirect":
            self._send(302, headers={"Location": "/img/scene.png"})
        elif self.path == "/img/other-host-redirect":
            self._send(302, headers={"Location": f"http://localhost:{port}/img/scene.png"})
        elif self.path == "/img/loop":
            self._send(302, headers={"Location": "/img/loop"})
        elif self.path == "/img/slow.png":
            time.sleep(3)
            self._send(200, SCENE_PNG)
        elif self.path == "/img/trickle.png":  # 12 bytes every 0.3 s: each read is quick, the whole is not
            self._send(200, headers={"Content-Type": "image/png", "Content-Length": str(len(SCENE_PNG))},
                       length=False)
            try:
                for i in range(0, len(SCENE_PNG), 12):
                    self.wfile.write(SCENE_PNG[i:i + 12])
                    self.wfile.flush()
                    time.sleep(0.3)
            except (BrokenPipeError, ConnectionResetError):
                pass
        elif self.path == "/private/scene.png":
            self._send(200, SCENE_PNG)
        else:
            self._send(404, b"not found")


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


# ------------------------------------------------------------------------- unit level


def test_allowlist_matching():
    allow = parse_allowlist(" images.example.com, cdn.example.net:8080 ,https://static.example.org/pub/,"
                            "http://x.example.io")
    assert allow == ("images.example.com", "cdn.example.net:8080", "https://static.example.org/pub/",
                     "http://x.example.io")
    ok = ["http://images.example.com/a.png", "https://IMAGES.example.com/a.png", "http://cdn.example.net:8080/a",
          "https://static.example.org/pub/a/b.png", "http://x.example.io", "http://x.example.io/a.png",
          "http://x.example.io?x=1"]
    bad = ["http://evil.com/a.png", "ftp://images.example.com/a.png", "file:///etc/passwd",
           "http://cdn.example.net/a", "http://cdn.example.net:9090/a", "https://static.example.org/private/a.png",
           "http://static.example.org/pub/a.png", "http://x.example.io.evil.com/a.png",
           "http://x.example.io@evil.com/a.png", "http://user:pw@images.example.com/a.png",
           "http://images.example.com.evil.com/a.png", "not a url",
           # a host entry admits the scheme's default port only
           "https://images.example.com:8443/a.png", "http://images.example.com:22/", "http://images.example.com:443/",
           # a prefix entry is not escaped by dot segments, however spelled
           "https://static.example.org/pub/../private/a.png", "https://static.example.org/pub/%2e%2e/private/a.png",
           "https://static.example.org/pub/%2E%2e/private/a.png", "https://static.example.org/pub/..%2fprivate/a.png",
           "https://static.example.org/pub/..%5cprivate/a.png", "https://static.example.org/pub/..;/private/a.png",
           "https://static.example.org/pub/%252e%252e/private/a.png", "https://static.example.org/pub/./../x.png",
           "https://static.example.org/pub", "https://static.example.org:444/pub/a.png"]
    for u in ok:
        assert url_allowed(u, allow), u
    for u in bad:
        assert not url_allowed(u, allow), u
    assert parse_allowlist(None) == parse_allowlist(" , ") == ()


def test_fetch_url_errors(server):
    port = int(server.rsplit(":", 1)[1])
    allow = (f"127.0.0.1:{port}", "127.0.0.1:9")
    kw = dict(max_bytes=MAX_BYTES, timeout_s=5.0, allow_private=True)
    assert fetch_url(f"{server}/img/scene.png", allow, **kw) == SCENE_PNG
    assert fetch_url(f"{server}/img/same-host-redirect", allow, **kw) == SCENE_PNG
    with pytest.raises(InvalidInput, match="disabled"):
        fetch_url(f"{server}/img/scene.png", (), **kw)
    with pytest.raises(URLNotAllowed):
        fetch_url(f"{server.replace('127.0.0.1', 'localhost')}/img/scene.png", allow, **kw)
    _Handler.requests.clear()
    with pytest.raises(URLNotAllowed, match="redirect"):
        fetch_url(f"{server}/img/other-host-redirect", (f"127.0.0.1:{port}", f"localhost:{port}"), **kw)
    assert _Handler.requests == ["/img/other-host-redirect"]  # the redirect was not followed
    with pytest.raises(InvalidInput, match="redirected more than"):
        fetch_url(f"{server}/img/loop", allow, **kw)
    with pytest.raises(PayloadTooLarge) as exc:
        fetch_url(f"{server}/img/big.png", allow, **kw)
    assert exc.value.limit == MAX_BYTES
    t0 = time.perf_counter()
    with pytest.raises(PayloadTooLarge, match="larger than"):
        fetch_url(f"{server}/img/stream.png", allow, **kw)
    assert time.perf_counter() - t0 < 5
    # A 404, a server too slow to answer and a closed port (9) read the same: a caller
    # cannot map which ports answer.
    details = set()
    for url, timeout in ((f"{server}/nothing-here", 5.0), (f"{server}/img/slow.png", 0.5),
                         ("http://127.0.0.1:9/x.png", 2.0)):
        with pytest.raises(InvalidInput) as exc:
            fetch_url(url, allow, max_bytes=MAX_BYTES, timeout_s=timeout, allow_private=True)
        details.add(exc.value.detail)
    assert details == {"image URL could not be fetched"}
    with pytest.raises(InvalidInput, match="http"):
        fetch_url("file:///etc/passwd", ("127.0.0.1",), **kw)


def test_fetch_url_overall_deadline(server):
    """An origin trickling 12 bytes every 0.3 s (each read well within the timeout) is cut
    off at the fetch's deadline, not after the whole body (about 20 s here)."""
    port = int(server.rsplit(":", 1)[1])
    t0 = time.perf_counter()
    with pytest.raises(InvalidInput, match="could not be fetched"):
        fetch_url(f"{server}/img/trickle.png", (f"127.0.0.1:{port}",), max_bytes=MAX_BYTES, timeout_s=1.0,
                  allow_private=True)
    assert time.perf_counter() - t0 < 2.0


def test_fetch_url_refuses_non_public_addresses(server):
    """Loopback (by IP or by name), private, link-local and metadata addresses are refused
    (403) before any connection unless allow_private, whatever the allow-list says."""
    port = int(server.rsplit(":", 1)[1])
    _Handler.requests.clear()
    for url in (f"{server}/img/scene.png", f"http://localhost:{port}/img/scene.png"):
        with pytest.raises(URLNotAllowed):
            fetch_url(url, (f"127.0.0.1:{port}", f"localhost:{port}"), max_bytes=MAX_BYTES, timeout_s=2.0)
    for host in ("10.1.2.3", "192.168.0.1", "169.254.169.254", "[::1]", "[::ffff:127.0.0.1]", "0.0.0.0",
                 "100.64.0.1", "[fe80::1]"):
        with pytest.raises(URLNotAllowed):
            fetch_url(f"http://{host}/a.png", (host.strip("[]"),), max_bytes=MAX_BYTES, timeout_s=2.0)
    assert _Handler.requests == []  # refused before connecting
    assert fetch_url(f"{server}/img/scene.png", (f"127.0.0.1:{port}",), max_bytes=MAX_BYTES, timeout_s=5.0,
                     allow_private=True) == SCENE_PNG


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("GLIPV2_URL_ALLOWLIST", "a.example.com,https://b.example.com/x/")
    monkeypatch.setenv("GLIPV2_URL_TIMEOUT_S", "2.5")
    s = Settings()
    assert parse_allowlist(s.url_allowlist) == ("a.example.com", "https://b.example.com/x/")
    assert s.url_timeout_s == 2.5
    monkeypatch.delenv("GLIPV2_URL_ALLOWLIST")
    assert Settings().url_allowlist is None


# ------------------------------------------------------------------------- over HTTP

needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="model_repository has no ONNX files: run `make export`")


def _client(**kw):
    from fastapi.testclient import TestClient

    from service.app import create_app

    kw = {"url_allow_private": True, "url_timeout_s": 5.0, **kw}
    settings = Settings(repository=REPO, threads=2, max_wait_ms=0.0, max_body_bytes=MAX_BYTES,
                        max_image_pixels=MAX_PIXELS, **kw)
    return TestClient(create_app(settings))


@pytest.fixture(scope="module")
def allowed(server):
    port = server.rsplit(":", 1)[1]
    with _client(url_allowlist=f"{server}/img/, localhost:{port}") as c:
        yield c


@pytest.fixture(scope="module")
def disabled():
    with _client() as c:
        yield c


@needs_onnx
def test_url_disabled_by_default(disabled, server):
    r = disabled.post("/v1/detect", json={"images": [{"url": f"{server}/img/scene.png", "prompt": "star"}]})
    assert r.status_code == 422
    assert "fetching image URLs is disabled" in r.json()["detail"]
    r = disabled.post("/v1/ground", json={"images": [{"url": f"{server}/img/scene.png", "caption": "a star"}]})
    assert r.status_code == 422 and "disabled" in r.json()["detail"]


@needs_onnx
def test_detect_and_ground_by_url(allowed, server):
    from glipv2.boxes import box_iou
    from training.shapes_world import SHAPES

    b64 = base64.b64encode(SCENE_PNG).decode()
    prompt = ". ".join(SHAPES) + "."
    r = allowed.post("/v1/detect", json={"images": [{"url": f"{server}/img/scene.png", "prompt": prompt},
                                                    {"image": b64, "prompt": prompt}]})
    assert r.status_code == 200, r.text
    by_url, by_b64 = r.json()["results"]
    assert (by_url["width"], by_url["height"]) == (SCENE.width, SCENE.height)
    assert by_url["detections"] == by_b64["detections"]
    found = sum(
        any(d["phrase"] == o.shape and box_iou(np.array([o.box], np.float32), np.array([d["box"]], np.float32))[0, 0] > 0.5
            for d in by_url["detections"] if d["score"] >= 0.3)
        for o in SCENE.objects)
    assert found >= len(SCENE.objects) / 2
    caption = " and ".join(f"a {o.colour} {o.shape}" for o in SCENE.objects)
    r = allowed.post("/v1/ground", json={"images": [{"url": f"{server}/img/same-host-redirect", "caption": caption}]})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["phrases"] == [f"{o.colour} {o.shape}" for o in SCENE.objects]


@needs_onnx
@pytest.mark.parametrize("path, code, words", [
    ("/private/scene.png", 403, "allow-list"),  # same host, outside the allowed prefix
    ("/img/other-host-redirect", 403, "redirect"),  # to localhost: allowed, but another host
    ("/img/big.png", 413, "limit"),
    ("/img/stream.png", 413, "larger than"),
    ("/img/pixels.png", 413, "pixels"),
    ("/img/text", 415, "not an image"),
    ("/img/missing.png", 422, "could not be fetched"),
    ("/img/../private/scene.png", 403, "allow-list"),  # climbing out of the allowed prefix
    ("/img/%2e%2e/private/scene.png", 403, "allow-list"),
    ("/img/..%2fprivate/scene.png", 403, "allow-list"),
])
def test_url_errors(allowed, server, path, code, words):
    r = allowed.post("/v1/detect", json={"images": [{"url": server + path, "prompt": "star"}]})
    assert r.status_code == code, r.text
    assert words in r.json()["detail"]


@needs_onnx
def test_url_schema_errors(allowed, server):
    b64 = base64.b64encode(SCENE_PNG).decode()
    for item in ({"prompt": "star"}, {"image": b64, "url": f"{server}/img/scene.png", "prompt": "star"}):
        r = allowed.post("/v1/detect", json={"images": [item]})
        assert r.status_code == 422, r.text
    r = allowed.post("/v1/detect", json={"images": [{"url": "http://evil.example.com/a.png", "prompt": "star"}]})
    assert r.status_code == 403 and "allow-list" in r.json()["detail"]
    r = allowed.post("/v1/detect", json={"images": [{"url": "ftp://127.0.0.1/a.png", "prompt": "star"}]})
    assert r.status_code == 422


@needs_onnx
def test_url_port_and_private_address_over_http(server):
    """A host entry without a port admits the default port only; without
    GLIPV2_URL_ALLOW_PRIVATE a loopback origin is refused (403) even when listed."""
    port = server.rsplit(":", 1)[1]
    body = {"images": [{"url": f"{server}/img/scene.png", "prompt": "star"}]}
    with _client(url_allowlist="127.0.0.1") as c:
        r = c.post("/v1/detect", json=body)
        assert r.status_code == 403, r.text
    with _client(url_allowlist=f"127.0.0.1:{port}", url_allow_private=False) as c:
        r = c.post("/v1/detect", json=body)
        assert r.status_code == 403, r.text
    with _client(url_allowlist=f"127.0.0.1:{port}") as c:
        assert c.post("/v1/detect", json=body).status_code == 200


@needs_onnx
def test_slow_origins_do_not_starve_the_gateway(server):
    """Eight requests naming an origin that trickles bytes (the URL deadline is 1.5 s):
    meanwhile readiness and base64 requests answer at once (URL fetches have their own
    pool), and every slow request ends by its deadline (422), none held for the ~20 s the
    origin would take."""
    import asyncio

    import httpx

    from service.app import create_app

    port = server.rsplit(":", 1)[1]
    settings = Settings(repository=REPO, threads=2, max_wait_ms=0.0, max_body_bytes=MAX_BYTES,
                        max_image_pixels=MAX_PIXELS, url_allowlist=f"127.0.0.1:{port}", url_allow_private=True,
                        url_timeout_s=1.5)
    app = create_app(settings)
    b64 = base64.b64encode(SCENE_PNG).decode()

    async def run():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw",
                                         timeout=30) as ac:
                async def slow():
                    t0 = time.perf_counter()
                    r = await ac.post("/v1/detect", json={"images": [{"url": f"{server}/img/trickle.png",
                                                                      "prompt": "star"}]})
                    return r.status_code, time.perf_counter() - t0

                slow_tasks = [asyncio.create_task(slow()) for _ in range(8)]
                await asyncio.sleep(0.3)
                t0 = time.perf_counter()
                ready = await ac.get("/health/ready")
                fast = await ac.post("/v1/detect", json={"images": [{"image": b64, "prompt": "star"}]})
                fast_s = time.perf_counter() - t0
                return ready.status_code, fast.status_code, fast_s, await asyncio.gather(*slow_tasks)

    ready, fast, fast_s, slow = asyncio.run(run())
    assert ready == 200 and fast == 200 and fast_s < 1.0, (ready, fast, fast_s)
    assert [code for code, _ in slow] == [422] * 8
    # 8 fetches, 4 fetch threads, 1.5 s each: the last ones finish by about 2 x 1.5 s
    assert max(t for _, t in slow) < 4.5, slow
