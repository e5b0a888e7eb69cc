"""The gateway with the Triton backend against the REAL tritonserver (the binary of the
nvidia-pytriton wheel, unpacked by export.local_triton) serving model_repository/ (cpu
flavour: python-backend models running the same ONNX files with ONNX Runtime).

The same API answers as with the embedded backend, the same detections; a Triton that
cannot be reached makes /health/ready fail and /v1/detect answer 503.
Skips where the ONNX files are missing or the tritonserver cannot be installed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from export.local_triton import TritonInstallError, TritonServer, free_port, install
from service.app import create_app
from service.settings import Settings
from tests.test_service import _b64, _concurrent, _scenes

REPO = Path(__file__).resolve().parents[1] / "model_repository"
pytestmark = [
    pytest.mark.skipif(
        not all((REPO / m / "1" / "model.onnx").is_file() for m in ("text_encoder", "detector")),
        reason="model_repository has no ONNX files: run `make export`",
    ),
    pytest.mark.timeout(600),
]


@pytest.fixture(scope="module")
def triton_url():
    try:
        root = install()
    except TritonInstallError as exc:
        pytest.skip(f"cannot install the tritonserver: {exc}")
    srv = TritonServer(REPO, root=root)
    srv.start()
    try:
        srv.wait_ready(timeout=120)
        yield srv.url_grpc
    finally:
        srv.stop()
        srv.cleanup()


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
