"""The fuzz target (issue 14): schemathesis over the gateway's OpenAPI schema with all of
its default checks (no 5xx, status codes, content types, headers and bodies conforming to
the schema, negative data rejected), with requests that reach inference.

Generated strings are almost never images, so the schema gives image fields a format of
their own (`base64-image`, service.schemas.IMAGE_FORMAT) and this module registers a
strategy for it: real PNG/JPEG/WebP shapes-world scenes, base64-encoded, so generated
requests carry generated prompts, questions, thresholds... with real images, and reach
the tokenizer, the batcher and ONNX Runtime. Multipart uploads get real image bytes the
same way.

`make test` runs a short pass (FUZZ_EXAMPLES=8 per operation and generation mode);
`make fuzz` runs FUZZ_EXAMPLES=150 (>= 2000 requests) and asserts the count. Also here:
the README's error table lists exactly the status codes the schema documents.
"""

from __future__ import annotations

import base64
import io
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402
from schemathesis.checks import positive_data_acceptance  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.python import asgi as st_asgi  # noqa: E402

from service.app import create_app  # noqa: E402
from service.schemas import IMAGE_FORMAT  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.schema_runs import run_operation  # noqa: E402
from tests.test_service import REPO, pytestmark  # noqa: E402,F401 (skip without ONNX files)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "8"))
MIN_REQUESTS = int(os.environ.get("FUZZ_MIN_REQUESTS", "0"))  # make fuzz: 2000
INFERENCE = {"/v1/detect", "/v1/ground", "/v1/detect/upload", "/v1/vqa", "/v1/vqa/upload", "/v1/caption",
             "/v1/caption/upload"}
COUNTS: Counter = Counter()  # (path, status) -> requests


def _images() -> list[bytes]:
    from training.shapes_world import render, sample_scene

    rng = np.random.default_rng(14)
    out = []
    for fmt, save in (("PNG", {}), ("JPEG", {"quality": 90}), ("WEBP", {"quality": 85}), ("PNG", {})):
        scene = sample_scene(rng)
        img = Image.fromarray(render(scene, rng)).resize((160, 120))
        buf = io.BytesIO()
        img.save(buf, fmt, **save)
        out.append(buf.getvalue())
    return out


IMAGES = _images()
schemathesis.openapi.format(IMAGE_FORMAT, st.sampled_from([base64.b64encode(b).decode() for b in IMAGES]))


@pytest.fixture(scope="module")
def app():
    # Generous queue, admission and timeout: a 503/504 here would be load, not a bug.
    cfg = Settings(repository=REPO, threads=2, max_wait_ms=0.0, queue_size=4096, request_timeout_s=120.0,
                   max_concurrent_requests=1024, max_body_bytes=2_000_000, max_image_pixels=4_000_000,
                   max_images_per_request=16)
    application = create_app(cfg)
    yield application
    st_asgi.shutdown_lifespans()


@pytest.fixture(scope="module")
def api_schema(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    yield schema
    total = sum(COUNTS.values())
    reached = sum(n for (path, code), n in COUNTS.items() if path in INFERENCE and code == 200)
    print(f"\nfuzz: {total} requests, {reached} answered by the model (200 on an inference route); "
          f"codes {dict(sorted(Counter(code for (_, code) in COUNTS.elements()).items()))}")


def _operations():
    from service.routes import detect, health, metrics, models, understanding  # noqa: F401

    return [("POST", p) for p in sorted(INFERENCE)] + [("GET", "/v1/models"), ("GET", "/v1/stats"),
                                                       ("GET", "/health/live"), ("GET", "/health/ready"),
                                                       ("GET", "/metrics")]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize(("method", "path"), _operations(), ids=lambda v: str(v))
def test_fuzz_all_checks(api_schema, method, path, mode):
    operation = api_schema[path][method]
    strategy = operation.as_strategy(generation_mode=mode)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy, pick=st.integers(0, len(IMAGES) - 1))
    def run(case, pick):
        if mode == GenerationMode.POSITIVE and case.media_type == "multipart/form-data" and isinstance(case.body, dict):
            case.body["image"] = IMAGES[pick]
        if mode == GenerationMode.POSITIVE and path == "/v1/ground" and pick % 2 == 0:
            # Generated captions have no noun phrase and generated spans fall outside them
            # (422): half the cases ground a real caption, by spans or automatically.
            for item in case.body.get("images", []):
                item["caption"] = "a red circle left of a blue star"
                item["phrases"] = [[2, 12], [[23, 32]]] if pick == 0 else None
                if item["phrases"] is None:
                    del item["phrases"]
        # positive_data_acceptance is left out: the schema cannot say that a prompt must
        # hold at least one word piece or that a caption needs a noun phrase (422s).
        response = case.call_and_validate(excluded_checks=[positive_data_acceptance], timeout=120)
        COUNTS[(path, response.status_code)] += 1

    run_operation(run, method, path, mode)


def test_fuzz_reached_inference(api_schema):
    """Runs after the fuzz tests: generated requests reached the model on every inference
    route, and `make fuzz` made at least FUZZ_MIN_REQUESTS requests."""
    if not COUNTS:
        pytest.skip("run together with test_fuzz_all_checks")
    reached = {path for (path, code) in COUNTS if path in INFERENCE and code == 200}
    assert reached == INFERENCE, sorted(INFERENCE - reached)
    assert sum(COUNTS.values()) >= MIN_REQUESTS, sum(COUNTS.values())


def test_readme_error_table_matches_the_schema():
    """The README's error table (| status | when |) lists exactly the error codes the
    schema documents for the inference routes (with an API key set, so 401 is in it)."""
    spec = create_app(Settings(repository=REPO, api_key="a-real-key-for-the-schema")).openapi()
    documented = set()
    for path in INFERENCE:
        documented |= {int(code) for code in spec["paths"][path]["post"]["responses"] if code != "200"}
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| status | when |"):]
    table = table[:table.index("\n\n")]
    listed = {int(m) for m in re.findall(r"^\| (\d{3}) \|", table, flags=re.M)}
    assert listed == documented, (sorted(listed - documented), sorted(documented - listed))


def test_schema_documents_the_server():
    """What schemathesis relies on: each image item says 'exactly one of image/url' (and
    the server agrees: both, neither or a null is a 422), uploads list 400/415/422, image
    fields carry the base64-image format and a real image as their example."""
    from fastapi.testclient import TestClient

    from service.schemas import EXAMPLE_IMAGE
    from service.images import decode_base64, decode_image

    app = create_app(Settings(repository=REPO))
    spec = app.openapi()
    schemas = spec["components"]["schemas"]
    for name in ("DetectItem", "GroundItem", "VqaItem", "CaptionItem"):
        one_of = schemas[name]["oneOf"]
        assert {tuple(alt["required"]) for alt in one_of} == {("image",), ("url",)}, name
        image = schemas[name]["properties"]["image"]
        assert image["format"] == IMAGE_FORMAT and image["type"] == "string", name
        assert decode_image(decode_base64(image["examples"][0]), 10_000).shape[2] == 3
    for path in ("/v1/detect/upload", "/v1/vqa/upload", "/v1/caption/upload"):
        assert {"400", "415", "422"} <= set(spec["paths"][path]["post"]["responses"]), path
    with TestClient(app) as c:
        for item in ({"prompt": "star"}, {"image": EXAMPLE_IMAGE, "url": "http://a.example/x.png", "prompt": "star"},
                     {"image": None, "url": "http://a.example/x.png", "prompt": "star"}):
            assert c.post("/v1/detect", json={"images": [item]}).status_code == 422, item
        assert c.post("/v1/detect", json={"images": [{"image": EXAMPLE_IMAGE, "prompt": "star"}]}).status_code == 200
