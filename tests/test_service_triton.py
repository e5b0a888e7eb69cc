"""The gateway with the Triton backend against the REAL tritonserver (the binary of the
nvidia-pytriton wheel, unpacked by export.local_triton) serving model_repository/ (cpu
flavour: python-backend models running the same ONNX files with ONNX Runtime).

The same API answers as with the embedded backend, the same detections; a Triton that
cannot be reached makes /health/ready fail and /v1/detect answer 503; with gRPC not
answering, the backend falls back to Triton's HTTP endpoint and answers the same.
The API tests of tests/test_service.py also run against this backend (its `backend_kind`
parametrization); the server is the one session-wide `triton_server` of that module.
Skips where the ONNX files are missing or the tritonserver cannot be installed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from export.local_triton import free_port
from service.app import create_app
from service.backends.triton import TritonBackend
from service.settings import Settings
from tests.test_service import _b64, _concurrent, _scenes, triton_server  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1] / "model_repository"
pytestmark = [
    pytest.mark.skipif(
        not all((REPO / m / "1" / "model.onnx").is_file() for m in ("text_encoder", "detector")),
        reason="model_repository has no ONNX files: run `make export`",
    ),
    pytest.mark.timeout(600),
]


@pytest.fixture(scope="module")
def triton_url(triton_server):
    return triton_server.url_grpc


def _settings(**kw) -> Settings:
    return Settings(**{"repository": REPO, "threads": 2, **kw})


def _items():
    scenes = _scenes(4, seed=99)
    prompts = ["circle. square. triangle. star. hexagon. ellipse.", ["red circle", "blue square"], "star.",
               ["green triangle", "large hexagon", "yellow ellipse"]]
    return [{"image": _b64(img), "prompt": p} for (_, img), p in zip(scenes, prompts)]


def test_triton_backend_matches_embedded(triton_url):
    items = _items()
    with TestClient(create_app(_settings(backend="triton", triton_url=triton_url))) as c:
        assert c.get("/health/ready").status_code == 200
        assert c.get("/v1/models").json()["backend"] == "triton"
        via_triton = c.post("/v1/detect", json={"images": items})
        assert via_triton.status_code == 200, via_triton.text
        # bad input is refused by the gateway the same way, before Triton is asked
        assert c.post("/v1/detect", json={"images": [{**items[0], "prompt": " . "}]}).status_code == 422
        assert c.post("/v1/detect", json={"images": [{**items[0], "image": "%%%"}]}).status_code == 422
    with TestClient(create_app(_settings(backend="embedded"))) as c:
        embedded = c.post("/v1/detect", json={"images": items})
    n = 0
    for a, b in zip(via_triton.json()["results"], embedded.json()["results"]):
        assert a["phrases"] == b["phrases"] and len(a["detections"]) == len(b["detections"])
        for da, db in zip(a["detections"], b["detections"]):
            assert da["phrase"] == db["phrase"] and abs(da["score"] - db["score"]) < 1e-3
            np.testing.assert_allclose(da["box"], db["box"], atol=0.05)
            n += 1
    assert n > 0


def test_triton_backend_concurrent_requests_batch(triton_url):
    payloads = [{"images": [item]} for item in _items() * 3]
    app = create_app(_settings(backend="triton", triton_url=triton_url, max_wait_ms=50.0))
    responses, stats, _ = asyncio.run(_concurrent(app, payloads))
    assert [r.status_code for r in responses] == [200] * len(payloads)
    assert stats["batcher"]["max_batch_seen"] > 1, stats
    assert stats["backend"]["text_encoder_calls"] == 4 and stats["backend"]["cache_hits"] == 8, stats


def test_unreachable_triton_is_503():
    url = f"127.0.0.1:{free_port()}"  # nothing listens there
    with TestClient(create_app(_settings(backend="triton", triton_url=url, request_timeout_s=20))) as c:
        r = c.get("/health/ready")
        assert r.status_code == 503 and "triton" in r.json()["detail"]
        r = c.post("/v1/detect", json={"images": _items()[:1]})
        assert r.status_code == 503, r.text
        assert c.get("/health/live").status_code == 200


def _detections(results):
    return [[(d["phrase"], d["score"], d["box"]) for d in res["detections"]] for res in results]


def test_http_fallback_when_grpc_does_not_answer(triton_server):
    items = _items()
    settings = _settings(backend="triton", triton_url=triton_server.url_grpc)
    with TestClient(create_app(settings)) as c:
        via_grpc = c.post("/v1/detect", json={"images": items})
        assert via_grpc.status_code == 200, via_grpc.text
        assert c.get("/v1/stats").json()["backend"]["protocol"] == "grpc"
    # nothing listens on the gRPC port; the HTTP endpoint is the real one
    settings = _settings(backend="triton", triton_url=f"127.0.0.1:{free_port()}",
                         triton_http_url=triton_server.url_http)
    backend = TritonBackend(REPO, settings.triton_url, http_url=settings.triton_http_url,
                            timeout_s=settings.request_timeout_s)
    with TestClient(create_app(settings, backend=backend)) as c:
        assert c.get("/health/ready").status_code == 200  # the probe's thread picks HTTP
        via_http = c.post("/v1/detect", json={"images": items})  # the batcher's thread, its own client
        assert via_http.status_code == 200, via_http.text
        assert c.get("/v1/stats").json()["backend"]["protocol"] == "http"
    # concurrent requests over HTTP, the first inference picking the protocol itself
    backend = TritonBackend(REPO, settings.triton_url, http_url=settings.triton_http_url)
    responses, stats, _ = asyncio.run(_concurrent(create_app(settings, backend=backend),
                                                  [{"images": [it]} for it in items * 3]))
    assert [r.status_code for r in responses] == [200] * len(items) * 3
    assert stats["backend"]["protocol"] == "http" and stats["batcher"]["items"] == len(items) * 3, stats
    a, b = _detections(via_grpc.json()["results"]), _detections(via_http.json()["results"])
    assert sum(map(len, a)) > 0 and [len(x) for x in a] == [len(x) for x in b]
    for ra, rb in zip(a, b):
        for (pa, sa, ba), (pb, sb, bb) in zip(ra, rb):
            assert pa == pb and abs(sa - sb) < 1e-5
            np.testing.assert_allclose(ba, bb, atol=1e-3)


def test_http_only_when_grpc_and_http_unreachable_is_503():
    settings = _settings(backend="triton", triton_url=f"127.0.0.1:{free_port()}",
                         triton_http_url=f"127.0.0.1:{free_port()}")
    backend = TritonBackend(REPO, settings.triton_url, http_url=settings.triton_http_url, timeout_s=5)
    with TestClient(create_app(settings, backend=backend)) as c:
        r = c.get("/health/ready")
        assert r.status_code == 503 and "grpc" in r.json()["detail"] and "http" in r.json()["detail"], r.text
        assert c.post("/v1/detect", json={"images": _items()[:1]}).status_code == 503


def test_triton_captions_equal_embedded_and_decode_inside_triton(triton_server):
    """/v1/caption through the Triton backend gives the embedded backend's captions (greedy
    and beam 3, a length limit), and each gateway batch is ONE request to Triton's caption
    model: caption_step never gets a request from the gateway, so the decoder caches stay
    in the server. Concurrent requests still batch (gateway batcher, then Triton)."""
    from export.local_triton import batch_summary

    images = [{"image": _b64(img)} for _, img in _scenes(6, seed=314)]
    bodies = [{"images": images, "max_len": 20}, {"images": images[:4], "beam_size": 3},
              {"images": images[4:], "max_len": 3}]
    with TestClient(create_app(_settings(backend="embedded"))) as c:
        embedded = [c.post("/v1/caption", json=b).json()["results"] for b in bodies]
    before = {m: batch_summary(triton_server.model_stats(m)) for m in ("caption", "caption_step")}
    with TestClient(create_app(_settings(backend="triton", triton_url=triton_server.url_grpc))) as c:
        via_triton = []
        for b in bodies:
            r = c.post("/v1/caption", json=b)
            assert r.status_code == 200, r.text
            via_triton.append(r.json()["results"])
        calls = c.get("/v1/stats").json()["backend"]["caption_decoder_calls"]
    after = {m: batch_summary(triton_server.model_stats(m)) for m in ("caption", "caption_step")}
    assert calls == len(bodies)  # one decode per request (one batch, one beam size each)
    assert after["caption"]["inference_count"] - before["caption"]["inference_count"] == 12  # images
    assert after["caption"]["execution_count"] - before["caption"]["execution_count"] == len(bodies)
    assert after["caption_step"]["inference_count"] == before["caption_step"]["inference_count"]
    for a, b in zip(via_triton, embedded):
        assert [r["caption"] for r in a] == [r["caption"] for r in b]
        assert [r["num_tokens"] for r in a] == [r["num_tokens"] for r in b]
        np.testing.assert_allclose([r["logprob"] for r in a], [r["logprob"] for r in b], atol=1e-4)
    assert all(r["num_tokens"] <= 3 for r in via_triton[2]) and len({r["caption"] for r in via_triton[0]}) > 3

    # concurrent single-image requests: the gateway batches them into few Triton requests
    app = create_app(_settings(backend="triton", triton_url=triton_server.url_grpc, max_wait_ms=50.0))

    async def concurrent_captions():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway",
                                         timeout=120) as ac:
                responses = await asyncio.gather(*(ac.post("/v1/caption", json={"images": [im]}) for im in images))
                return responses, (await ac.get("/v1/stats")).json()

    responses, stats = asyncio.run(concurrent_captions())
    assert [r.status_code for r in responses] == [200] * len(images)
    assert stats["batchers"]["caption"]["max_batch_seen"] > 1, stats["batchers"]["caption"]
    assert stats["backend"]["caption_decoder_calls"] < len(images)
