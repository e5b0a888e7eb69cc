"""The gateway end to end: the real app (create_app + lifespan) over HTTP through httpx,
real ONNX Runtime on the demo model's ONNX files in model_repository/.

Needs model_repository/{text_encoder,detector}/1/model.onnx (`make export`); skips with
that reason where they are missing.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from glipv2.boxes import box_iou
from service.app import create_app
from export.local_triton import TritonInstallError, TritonServer, install
from service.backends.embedded import EmbeddedBackend
from service.settings import Settings
from training.shapes_world import SHAPES, sample_scene, render

REPO = Path(__file__).resolve().parents[1] / "model_repository"
pytestmark = pytest.mark.skipif(
    not all((REPO / m / "1" / "model.onnx").is_file() for m in ("text_encoder", "detector")),
    reason="model_repository has no ONNX files: run `make export`",
)

MAX_PIXELS = 1_000_000
MAX_BODY = 3_000_000


BACKENDS = ["embedded", "triton"]


def _settings(**kw) -> Settings:
    base = dict(repository=REPO, max_image_pixels=MAX_PIXELS, max_body_bytes=MAX_BODY, max_wait_ms=20.0,
                threads=2, max_images_per_request=8)
    return Settings(**{**base, **kw})


# One real tritonserver (export.local_triton: the nvidia-pytriton binary, cpu flavour:
# python-backend models running the same ONNX files) for the whole session, started on
# first use and shared with tests/test_service_triton.py, which imports `triton_server`
# (a fixture imported into another module gets its own FixtureDef, hence the module-level
# singleton). Stopped at exit; it also dies with this process (PDEATHSIG).
_TRITON: dict = {}


def _shared_triton() -> TritonServer:
    if "server" in _TRITON:
        return _TRITON["server"]
    if "skip" in _TRITON:
        pytest.skip(_TRITON["skip"])
    try:
        root = install()
    except TritonInstallError as exc:
        _TRITON["skip"] = f"cannot install the tritonserver: {exc}"
        pytest.skip(_TRITON["skip"])
    srv = TritonServer(REPO, root=root)
    srv.start()
    try:
        srv.wait_ready(timeout=120)
    except BaseException:
        srv.stop()
        srv.cleanup()
        raise

    def _stop():
        srv.stop()
        srv.cleanup()

    atexit.register(_stop)
    _TRITON["server"] = srv
    return srv


@pytest.fixture(scope="session")
def triton_server() -> TritonServer:
    return _shared_triton()


@pytest.fixture(scope="module", params=BACKENDS)
def backend_kind(request) -> str:
    """'embedded' or 'triton' (against the shared real tritonserver)."""
    if request.param == "triton":
        request.getfixturevalue("triton_server")
    return request.param


@pytest.fixture(scope="module")
def backend_settings(backend_kind):
    """_settings() for backend_kind: kw -> Settings."""
    extra = {"backend": backend_kind}
    if backend_kind == "triton":
        extra["triton_url"] = _shared_triton().url_grpc

    def make(**kw) -> Settings:
        return _settings(**{**extra, **kw})

    return make


def _b64(img: np.ndarray | Image.Image, fmt: str = "PNG", **save) -> str:
    pil = img if isinstance(img, Image.Image) else Image.fromarray(img)
    buf = io.BytesIO()
    pil.save(buf, fmt, **save)
    return base64.b64encode(buf.getvalue()).decode()


def _scenes(n: int, seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng)
        out.append((scene, render(scene, rng)))
    return out


@pytest.fixture(scope="module")
def client(backend_settings):
    with TestClient(create_app(backend_settings())) as c:
        yield c


def _detect(client, items, **kw):
    return client.post("/v1/detect", json={"images": items, **kw})


# ------------------------------------------------------------------------------ detection


def test_detect_finds_shapes(client):
    scenes = _scenes(8, seed=123)
    items = [{"image": _b64(img), "prompt": ". ".join(SHAPES) + "."} for _, img in scenes]
    r = _detect(client, items)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == len(scenes)
    found = total = 0
    for (scene, img), res in zip(scenes, body["results"]):
        assert (res["width"], res["height"]) == (img.shape[1], img.shape[0])
        assert res["phrases"] == list(SHAPES)
        dets = [d for d in res["detections"] if d["score"] >= 0.3]
        for obj in scene.objects:
            total += 1
            boxes = np.array([d["box"] for d in dets if d["phrase"] == obj.shape], dtype=np.float32).reshape(-1, 4)
            if len(boxes) and box_iou(np.array([obj.box], np.float32), boxes).max() > 0.5:
                found += 1
    assert total > 0 and found / total >= 0.8, f"found {found} of {total} objects"
    assert body["timings"]["total_ms"] > 0


def test_several_images_different_prompts_equal_single(client):
    (s1, im1), (s2, im2), (s3, im3) = _scenes(3, seed=7)
    items = [
        {"image": _b64(im1), "prompt": "circle. square. triangle. star. hexagon. ellipse."},
        {"image": _b64(im2, "JPEG", quality=95), "prompt": [f"{o.colour} {o.shape}" for o in s2.objects]},
        {"image": _b64(im3, "WEBP", lossless=True), "prompt": ["star"]},
    ]
    batched = _detect(client, items)
    assert batched.status_code == 200, batched.text
    results = batched.json()["results"]
    assert results[1]["phrases"] == [f"{o.colour} {o.shape}" for o in s2.objects]
    assert results[2]["prompt"] == "star."
    for item, res in zip(items, results):
        for d in res["detections"]:
            assert res["phrases"][d["phrase_index"]] == d["phrase"]
            x0, y0, x1, y1 = d["box"]
            assert 0 <= x0 < x1 <= res["width"] and 0 <= y0 < y1 <= res["height"]
        single = _detect(client, [item]).json()["results"][0]
        assert len(single["detections"]) == len(res["detections"])
        for a, b in zip(single["detections"], res["detections"]):
            assert a["phrase"] == b["phrase"]
            assert abs(a["score"] - b["score"]) < 1e-3
            np.testing.assert_allclose(a["box"], b["box"], atol=0.05)


def test_thresholds_and_max_detections(client):
    (_, img), = _scenes(1, seed=3)
    items = [{"image": _b64(img), "prompt": "circle. star."}]
    r = _detect(client, items, score_threshold=0.0, max_detections=3).json()
    assert len(r["results"][0]["detections"]) == 3
    r = _detect(client, items, score_threshold=0.99).json()
    assert all(d["score"] > 0.99 for d in r["results"][0]["detections"])


def test_exif_orientation_applied(client):
    img = Image.new("RGB", (300, 200), (200, 200, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = _b64(img, "JPEG", exif=exif.tobytes())
    res = _detect(client, [{"image": data, "prompt": "circle."}]).json()["results"][0]
    assert (res["width"], res["height"]) == (200, 300)


def test_data_url_accepted(client):
    img = np.full((64, 64, 3), 200, np.uint8)
    r = _detect(client, [{"image": "data:image/png;base64," + _b64(img), "prompt": "circle"}])
    assert r.status_code == 200, r.text


# -------------------------------------------------------------------------------- errors


def _tiny_png() -> str:
    return _b64(np.full((32, 32, 3), 100, np.uint8))


@pytest.mark.parametrize(
    "payload, status",
    [
        ({"images": [{"image": "not base64 !!", "prompt": "circle."}]}, 422),
        ({"images": [{"image": base64.b64encode(b"hello world, no image").decode(), "prompt": "circle."}]}, 415),
        ({"images": [{"image": "GIF", "prompt": "circle."}]}, 415),
        ({"images": [{"image": "BMP", "prompt": "circle."}]}, 415),
        ({"images": [{"image": "TRUNCATED", "prompt": "circle."}]}, 422),
        ({"images": [{"image": "OK", "prompt": ""}]}, 422),
        ({"images": [{"image": "OK", "prompt": " . . "}]}, 422),
        ({"images": [{"image": "OK", "prompt": []}]}, 422),
        ({"images": [{"image": "OK", "prompt": ["circle", ""]}]}, 422),
        ({"images": [{"image": "OK", "prompt": "circle."}], "score_threshold": 1.5}, 422),
        ({"images": [{"image": "OK", "prompt": "circle."}], "max_detections": 0}, 422),
        ({"images": []}, 422),
        ({"images": [{"image": "OK"}]}, 422),
        ({"images": [{"image": "OK", "prompt": "circle."}] * 9}, 413),
    ],
)
def test_bad_inputs(client, payload, status):
    substitutes = {
        "OK": _tiny_png(),
        "GIF": _b64(Image.new("RGB", (16, 16)), "GIF"),
        "BMP": _b64(Image.new("RGB", (16, 16)), "BMP"),
        "TRUNCATED": base64.b64encode(base64.b64decode(_b64(np.random.default_rng(0).integers(
            0, 255, (64, 64, 3), dtype=np.uint8)))[:400]).decode(),
    }
    for item in payload["images"]:
        item["image"] = substitutes.get(item["image"], item["image"])
    r = client.post("/v1/detect", json=payload)
    assert r.status_code == status, r.text
    assert "detail" in r.json()


def test_prompt_over_256_tokens(client):
    prompt = ". ".join(f"red circle number {i}" for i in range(80))
    r = _detect(client, [{"image": _tiny_png(), "prompt": prompt}])
    assert r.status_code == 422, r.text
    assert r.json()["limit"] == 256 and "256" in r.json()["detail"]


def test_too_many_pixels(client):
    # 1100 x 1000 > MAX_PIXELS, a small file
    r = _detect(client, [{"image": _b64(Image.new("RGB", (1100, 1000))), "prompt": "circle."}])
    assert r.status_code == 413, r.text
    assert r.json()["limit"] == MAX_PIXELS


def test_decompression_bomb_refused_before_decoding(client):
    bomb = _b64(Image.new("1", (20_000, 20_000)))  # 400 Mpx in a few kB of PNG
    assert len(bomb) < 200_000
    started = time.perf_counter()
    r = _detect(client, [{"image": bomb, "prompt": "circle."}])
    assert r.status_code == 413, r.text
    assert time.perf_counter() - started < 2.0


def test_body_too_large(client):
    big = base64.b64encode(b"\0" * (MAX_BODY + 10)).decode()
    r = _detect(client, [{"image": big, "prompt": "circle."}])
    assert r.status_code == 413, r.text
    assert r.json()["limit"] == MAX_BODY


def test_body_too_large_without_content_length(client):
    def chunks():
        yield b'{"images": [{"image": "'
        for _ in range(4):
            yield b"A" * 1_000_000
        yield b'", "prompt": "circle."}]}'

    r = client.post("/v1/detect", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text


def test_malformed_json(client):
    r = client.post("/v1/detect", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


# ---------------------------------------------------------------------- models, health, ids


def test_models_from_manifest(client, backend_kind):
    r = client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["backend"] == backend_kind and body["preset"] == "tiny"
    assert body["image_hw"] == [256, 256] and body["max_tokens"] == 256
    assert {m["name"] for m in body["models"]} == {"text_encoder", "detector", "vqa", "caption_start", "caption_step"}
    assert body["tasks"] == ["detect", "vqa", "caption"] and "red" in body["answer_vocabulary"]


def test_health_and_request_id(client):
    assert client.get("/health/live").json()["status"] == "ok"
    r = client.get("/health/ready")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert len(r.headers["x-request-id"]) >= 16
    assert client.get("/health/live", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    # also on errors answered by the middleware
    assert "x-request-id" in client.post("/v1/detect", content=b"x" * (MAX_BODY + 1)).headers


def test_not_ready_before_startup_and_when_backend_fails(backend_kind, backend_settings):
    settings = backend_settings()
    c = TestClient(create_app(settings))  # no `with`: lifespan not run, no model loaded
    assert c.get("/health/ready").status_code == 503
    assert c.get("/health/live").status_code == 200
    assert c.post("/v1/detect", json={"images": [{"image": _tiny_png(), "prompt": "a"}]}).status_code == 503

    if backend_kind == "triton":
        from service.backends.triton import TritonBackend as Base

        args = (REPO, settings.triton_url)
    else:
        Base, args = EmbeddedBackend, (REPO,)

    class Broken(Base):
        def ping(self):
            raise ConnectionError("engine gone")

    with TestClient(create_app(settings, backend=Broken(*args))) as c:
        r = c.get("/health/ready")
        assert r.status_code == 503 and "engine gone" in r.json()["detail"]


def test_api_key():
    with TestClient(create_app(_settings(api_key="s3cr3t-key"))) as c:
        item = {"image": _tiny_png(), "prompt": "circle."}
        assert c.post("/v1/detect", json={"images": [item]}).status_code == 401
        assert c.post("/v1/detect", json={"images": [item]}, headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.post("/v1/detect", json={"images": [item]}, headers={"X-API-Key": "s3cr3t-key"}).status_code == 200
        assert c.get("/health/live").status_code == 200  # health stays open


# ------------------------------------------------------------------ batching and the cache


async def _concurrent(app, payloads):
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as ac:
            responses = await asyncio.gather(*(ac.post("/v1/detect", json=p) for p in payloads))
            stats = (await ac.get("/v1/stats")).json()
            metrics = (await ac.get("/metrics")).text
    return responses, stats, metrics


def test_concurrent_requests_form_batches(backend_settings):
    scenes = _scenes(16, seed=11)
    prompts = ["circle.", "red square. blue star.", ["triangle", "hexagon", "ellipse", "green circle"]]
    payloads = [{"images": [{"image": _b64(img), "prompt": prompts[i % 3]}]} for i, (_, img) in enumerate(scenes)]
    app = create_app(backend_settings(max_wait_ms=100.0, max_batch_size=8))
    responses, stats, metrics = asyncio.run(_concurrent(app, payloads))
    assert [r.status_code for r in responses] == [200] * 16
    b = stats["batcher"]
    assert b["items"] == 16 and b["max_batch_seen"] > 1 and b["batches"] < 16, b
    # three distinct prompts: the text encoder ran three times, the rest were cache hits
    assert stats["backend"]["text_encoder_calls"] == 3, stats
    assert stats["backend"]["cache_hits"] == 13, stats
    # the Prometheus view of the same: fewer than 16 engine calls carried the 16 images
    lines = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if not line.startswith("#"))
    assert lines['glipv2_batch_size_bucket{task="detect",le="1"}'] != lines['glipv2_batch_size_count{task="detect"}']
    assert int(lines['glipv2_batch_size_sum{task="detect"}']) == 16
    assert int(lines['glipv2_batch_size_count{task="detect"}']) < 16
    assert lines['glipv2_requests_total{method="POST",route="/v1/detect",status="200"}'] == "16"
    assert lines["glipv2_prompt_cache_hits_total"] == "13"


def test_repeated_prompt_is_a_cache_hit(backend_settings):
    with TestClient(create_app(backend_settings())) as c:
        item = {"image": _tiny_png(), "prompt": "purple hexagon. tiny star."}
        c.post("/v1/detect", json={"images": [item]})
        before = c.get("/v1/stats").json()["backend"]
        c.post("/v1/detect", json={"images": [item]})
        # the same phrases as a list tokenize to the same ids: also a hit
        c.post("/v1/detect", json={"images": [{**item, "prompt": ["purple hexagon", "tiny star"]}]})
        after = c.get("/v1/stats").json()["backend"]
    assert after["cache_hits"] - before["cache_hits"] == 2
    assert after["text_encoder_calls"] == before["text_encoder_calls"]


class _Slow(EmbeddedBackend):
    def run_batch(self, items):
        time.sleep(0.5)
        return super().run_batch(items)


def test_queue_full_is_503_with_retry_after():
    with TestClient(create_app(_settings(queue_size=2), backend=_Slow(REPO))) as c:
        item = {"image": _tiny_png(), "prompt": "circle."}
        r = c.post("/v1/detect", json={"images": [item] * 3})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["limit"] == 2
        assert c.post("/v1/detect", json={"images": [item] * 2}).status_code == 200


def test_timeout_is_504():
    with TestClient(create_app(_settings(request_timeout_s=0.1), backend=_Slow(REPO))) as c:
        r = c.post("/v1/detect", json={"images": [{"image": _tiny_png(), "prompt": "circle."}]})
        assert r.status_code == 504, r.text


def test_multipart_upload(client):
    (scene, img), = _scenes(1, seed=21)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    r = client.post("/v1/detect/upload", files={"image": ("scene.png", buf.getvalue(), "image/png")},
                    data={"prompt": "circle. square. triangle. star. hexagon. ellipse.", "max_detections": "5"})
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert (res["width"], res["height"]) == (img.shape[1], img.shape[0]) and len(res["detections"]) <= 5
    json_res = _detect(client, [{"image": _b64(img), "prompt": "circle. square. triangle. star. hexagon. ellipse."}],
                       max_detections=5).json()["results"][0]
    assert [d["box"] for d in res["detections"]] == [d["box"] for d in json_res["detections"]]
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, "GIF")
    assert client.post("/v1/detect/upload", files={"image": ("x.gif", gif.getvalue(), "image/gif")},
                       data={"prompt": "circle."}).status_code == 415
    assert client.post("/v1/detect/upload", files={"image": ("x.png", buf.getvalue(), "image/png")},
                       data={"prompt": ""}).status_code == 422
    assert client.post("/v1/detect/upload", data={"prompt": "circle."}).status_code == 422


@pytest.mark.parametrize(
    "body",
    [
        b'{"images":[{"image":"OK","prompt":"\\ud800"}]}',
        b'{"images":[{"image":"OK","prompt":"circle."}],"score_threshold":NaN}',
        b'{"images":[{"image":"OK","prompt":"circle."}],"max_detections":1e309}',
        b'{"images":[{"image":"OK","prompt":"\\u200b"}]}',
        b'{"images":[{"image":"OK","prompt":["\\u0000"]}]}',
        b"[]", b"null", b'{"images": null}', b'{"images":[null]}', b'{"images":[{"image":1,"prompt":2}]}',
        b'{"images":[{"image":"UklGRgAAAABXRUJQVlA4IA==","prompt":"circle."}]}',  # WebP header only
        b'{"images":[{"image":"/9j/4GdhcmJhZ2U=","prompt":"circle."}]}',  # JPEG header, garbage
    ],
)
def test_odd_requests_are_4xx_never_5xx(client, body):
    body = body.replace(b'"OK"', b'"' + _tiny_png().encode() + b'"')
    r = client.post("/v1/detect", content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text


def test_ground_phrases_given_as_spans(client):
    scenes = _scenes(6, seed=31)
    items, truth = [], []
    for scene, img in scenes:
        caption, spans, objs = "i see", [], []
        for k, obj in enumerate(scene.objects[:3]):
            caption += (" and " if k else " ") + "a "
            start = len(caption)
            caption += f"{obj.colour} {obj.shape}"
            spans.append([start, len(caption)])
            objs.append(obj)
        items.append({"image": _b64(img), "caption": caption, "phrases": spans})
        truth.append(objs)
    r = client.post("/v1/ground", json={"images": items})
    assert r.status_code == 200, r.text
    hits = total = 0
    for res, objs, item in zip(r.json()["results"], truth, items):
        assert res["prompt"] == item["caption"]
        assert res["phrases"] == [f"{o.colour} {o.shape}" for o in objs]
        for p, obj in enumerate(objs):
            total += 1
            best = [d for d in res["detections"] if d["phrase_index"] == p][:1]  # highest score first
            if best and box_iou(np.array([obj.box], np.float32), np.array([best[0]["box"]], np.float32))[0, 0] > 0.5:
                hits += 1
    assert hits / total >= 0.6, f"recall@1 {hits}/{total}"
    bad = {"images": [{**items[0], "phrases": [[3, 999]]}]}
    assert client.post("/v1/ground", json=bad).status_code == 422
    bad = {"images": [{**items[0], "phrases": [[1, 2, 3]]}]}
    assert client.post("/v1/ground", json=bad).status_code == 422
    multi = {"images": [{**items[0], "phrases": [[items[0]["phrases"][0], items[0]["phrases"][-1]]]}]}
    assert client.post("/v1/ground", json=multi).status_code == 200


def test_openapi_documents_the_api(client):
    schema = client.get("/openapi.json").json()
    assert {"/v1/detect", "/v1/detect/upload", "/v1/ground", "/v1/models", "/health/live", "/health/ready",
            "/metrics"} <= set(schema["paths"])
    detect = schema["paths"]["/v1/detect"]["post"]
    assert {"200", "413", "415", "422", "503", "504"} <= set(detect["responses"])
    box = schema["components"]["schemas"]["Detection"]["properties"]["box"]
    assert "original image" in box["description"] and box["minItems"] == box["maxItems"] == 4
