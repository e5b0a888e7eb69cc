"""Hostile input and faults against the real gateway (issue 14): corrupt images on every
decoding route, /metrics label floods, the prompt cache's byte bound, what stays open
with an API key, 503s from a dead backend. The real app (create_app + lifespan, embedded
ONNX Runtime on model_repository/) through Starlette's TestClient; the dead backend is
the real TritonBackend pointed at a port where nothing listens."""

from __future__ import annotations

import base64
import io
import socket

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from glipv2.runtime.batch import FeatureCache
from service.errors import ServiceError
from service.images import decode_image
from service.settings import Settings
from tests.test_service import REPO, _settings, pytestmark  # noqa: F401 (skip without ONNX files)

# The 28-byte PNG: a signature and an IHDR chunk cut short (PIL: ValueError).
TRUNCATED_IHDR = "iVBORw0KGgoAAAAASUhEUgAAAAA="


def _encoded(fmt: str, **save) -> bytes:
    rng = np.random.default_rng(5)
    frames = [Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)) for _ in range(2)]
    buf = io.BytesIO()
    if fmt == "APNG":
        frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:], duration=50)
    else:
        frames[0].save(buf, fmt, **save)
    return buf.getvalue()


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(_settings())) as c:
        yield c


# ------------------------------------------------------------- finding 1: corrupt images

def test_decode_never_raises_outside_the_service_errors():
    """Every prefix of a PNG, APNG, JPEG and WebP file, and 300 damaged copies of each:
    decode_image answers pixels or a ServiceError (4xx), never anything else."""
    rng = np.random.default_rng(0)
    for fmt, save in (("PNG", {}), ("APNG", {}), ("JPEG", {"quality": 90}), ("WEBP", {"quality": 80})):
        data = _encoded(fmt, **save)
        variants = [data[:n] for n in range(len(data))]
        for _ in range(300):  # bytes changed, half of them in the headers, then cut at random
            b = bytearray(data)
            for i in rng.integers(0, min(len(b), int(rng.choice([48, len(b)]))), size=int(rng.integers(1, 8))):
                b[i] = int(rng.integers(0, 256))
            variants.append(bytes(b[:int(rng.integers(len(b) // 2, len(b) + 1))]))
        if fmt in ("PNG", "APNG"):
            variants += _short_chunks(data)
        for v in variants:
            try:
                decode_image(v, 1_000_000)
            except ServiceError as exc:
                assert 400 <= exc.status_code < 500, (fmt, len(v), exc)


def _short_chunks(png: bytes) -> list[bytes]:
    """Each chunk of a PNG declaring fewer bytes than it holds (IHDR, acTL, fcTL, ...): the
    shapes that made PIL raise ValueError ('Truncated IHDR chunk') instead of OSError."""
    out, pos = [], 8
    while pos + 8 <= len(png):
        length = int.from_bytes(png[pos:pos + 4], "big")
        for short in sorted({0, 1, length // 2, max(length - 1, 0)}):
            if short < length:
                b = bytearray(png)
                b[pos:pos + 4] = short.to_bytes(4, "big")
                out += [bytes(b), bytes(b[:pos + 8 + short])]
        pos += 12 + length
    return out


JSON_ROUTES = {
    "/v1/detect": lambda img: {"images": [{"image": img, "prompt": "circle."}]},
    "/v1/ground": lambda img: {"images": [{"image": img, "caption": "a red circle", "phrases": [[2, 12]]}]},
    "/v1/vqa": lambda img: {"images": [{"image": img, "question": "what shape is it?"}]},
    "/v1/caption": lambda img: {"images": [{"image": img}]},
}
UPLOAD_ROUTES = {
    "/v1/detect/upload": {"prompt": "circle."},
    "/v1/vqa/upload": {"question": "what shape is it?"},
    "/v1/caption/upload": {},
}
CORRUPT = {
    "truncated-ihdr": base64.b64decode(TRUNCATED_IHDR),
    "truncated-apng": _encoded("APNG")[:120],
    "truncated-jpeg": _encoded("JPEG")[:200],
}


@pytest.mark.parametrize("kind", sorted(CORRUPT))
@pytest.mark.parametrize("route", sorted(JSON_ROUTES) + sorted(UPLOAD_ROUTES))
def test_corrupt_image_is_422_on_every_route(client, route, kind):
    raw = CORRUPT[kind]
    if route in JSON_ROUTES:
        r = client.post(route, json=JSON_ROUTES[route](base64.b64encode(raw).decode()))
    else:
        r = client.post(route, files={"image": ("x.png", raw, "image/png")}, data=UPLOAD_ROUTES[route])
    if r.status_code == 501:
        pytest.skip(f"{route}: the served model lacks this head")
    assert r.status_code == 422, (route, kind, r.status_code, r.text)
    assert "image" in r.json()["detail"]


# ------------------------------------------------------------ finding 7: /metrics labels

def test_unknown_methods_do_not_grow_metrics():
    """200 requests with 200 different invented method tokens (refused: 401 with a key,
    405 without) add at most one series ('other'), not 200."""
    for key in ("s3cr3t-key", None):
        with TestClient(create_app(_settings(api_key=key, open_endpoints="live,metrics"))) as c:
            before = ""
            for i in range(200):
                r = c.request(f"BREW{i}", "/v1/detect")
                assert r.status_code in (401, 405), r.status_code
                if i == 0:  # the first one (and GET /metrics) may add a series and a histogram
                    c.get("/metrics")
                    before = c.get("/metrics").text
            after = c.get("/metrics").text
        series = [line for line in after.splitlines() if line.startswith("glipv2_requests_total{")]
        assert not any("BREW" in s for s in series)
        assert len(after) - len(before) < 200, (len(before), len(after))  # counters' digits only
        assert any('method="other"' in s for s in series)


# --------------------------------------------------------- finding 9: cache bounded by bytes

def test_feature_cache_bounded_by_bytes():
    cache = FeatureCache(capacity=1024, max_bytes=1_000_000)
    for i in range(100):  # 100 entries of 256 x 384 float32 = 393 KB each
        cache.put(i.to_bytes(8, "little"), np.zeros((256, 384), np.float32))
        assert cache.nbytes <= 1_000_000
    assert len(cache) == 2 and cache.get((99).to_bytes(8, "little")) is not None
    assert cache.get((0).to_bytes(8, "little")) is None  # least recently used went first
    cache.put(b"big", np.zeros((1000, 1000), np.float32))  # larger than the whole budget: not kept
    assert cache.get(b"big") is None and cache.nbytes <= 1_000_000


def test_prompt_cache_bytes_setting_bounds_the_gateway():
    """Through the app: 30 distinct long prompts with GLIPV2_PROMPT_CACHE_MB=1 keep the
    cache under 1 MiB (the count limit alone would keep all 30)."""
    with TestClient(create_app(_settings(prompt_cache_mb=1))) as c:
        png = _tiny_png()
        words = ["red", "green", "blue", "yellow", "purple", "orange"]
        for i in range(30):
            prompt = ". ".join(f"{words[(i + j) % 6]} shape {i} {j}" for j in range(40)) + "."
            r = c.post("/v1/detect", json={"images": [{"image": png, "prompt": prompt}]})
            assert r.status_code == 200, r.text
        stats = c.get("/v1/stats").json()["backend"]
    assert stats["cache_misses"] == 30
    assert 0 < stats["cache_bytes"] <= 1024 * 1024 and stats["cache_size"] < 30, stats


def _tiny_png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (30, 120, 200)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


# --------------------------------------------------- finding 11: what an API key leaves open

@pytest.mark.parametrize("open_endpoints", [None, "live,ready,metrics,docs,demo", "live"])
def test_open_endpoints_setting(open_endpoints):
    kw = {} if open_endpoints is None else {"open_endpoints": open_endpoints}
    opened = set((open_endpoints or "live,demo").split(","))
    paths = {"live": "/health/live", "ready": "/health/ready", "metrics": "/metrics", "docs": "/docs",
             "demo": "/"}
    with TestClient(create_app(_settings(api_key="s3cr3t-key", **kw))) as c:
        for name, path in paths.items():
            anon = c.get(path)
            assert anon.status_code == (200 if name in opened else 401), (path, anon.status_code)
            assert c.get(path, headers={"X-API-Key": "s3cr3t-key"}).status_code == 200, path
        for path in ("/openapi.json", "/redoc", "/docs/assets/swagger-ui.css"):
            assert c.get(path).status_code == (200 if "docs" in opened else 401)
        assert c.get("/v1/models").status_code == 401  # the API itself always needs the key


def test_open_endpoints_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown open_endpoints"):
        Settings(repository=REPO, open_endpoints="live,admin")


# ------------------------------------ finding 8 (part): the key is checked before the body

def test_api_key_checked_before_the_body_is_parsed():
    """Without the key, an unparsable (or huge) body gets 401, not 422/413: nothing is
    read or parsed for an unauthenticated caller."""
    with TestClient(create_app(_settings(api_key="s3cr3t-key"))) as c:
        r = c.post("/v1/detect", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"] == "APIKey"
        r = c.post("/v1/detect", content=b"x" * 5_000_000, headers={"Content-Type": "application/json"})
        assert r.status_code == 401, r.status_code
        r = c.post("/v1/detect", content=b"{not json",
                   headers={"Content-Type": "application/json", "X-API-Key": "s3cr3t-key"})
        assert r.status_code in (400, 422), r.text


# ------------------------------------------------- finding 5: 503s from a dead backend

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_backend_down_503_has_retry_after():
    """The Triton backend with nothing listening at its address: inference and readiness
    answer 503 with Retry-After (the README's promise), never a 500."""
    settings = _settings(backend="triton", triton_url=f"127.0.0.1:{_free_port()}", retry_after_s=3)
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/detect", json={"images": [{"image": _tiny_png(), "prompt": "circle."}]})
        assert r.status_code == 503, r.text
        assert r.headers.get("retry-after") == "3"
        r = c.get("/health/ready")
        assert r.status_code == 503 and r.headers.get("retry-after") == "3"
