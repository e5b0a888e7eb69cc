"""The README's first example runs as written: its curl command block, executed by bash
against the real gateway (uvicorn, embedded ONNX Runtime, the demo model), answers what the
README shows (boxes to 0.01 px, scores to 1e-4, same order; timings vary, their keys don't).

When the model changes, the failure message prints the new response to paste into the
README (`pytest tests/test_readme_example.py`)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.settings import Settings
from tests.live_server import serve_in_thread

ROOT = Path(__file__).resolve().parents[1]
REPO = ROOT / "model_repository"


def _readme_blocks() -> tuple[str, dict]:
    """(the bash block with the curl request, the JSON block that follows it)."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(\w*)\n(.*?)```", text, re.S)
    for i, (lang, body) in enumerate(blocks):
        if lang == "bash" and "localhost:8000/v1/detect" in body:
            lang2, answer = blocks[i + 1]
            assert lang2 == "json", "the README's curl example is not followed by its JSON answer"
            return body, json.loads(answer)
    raise AssertionError("README.md has no curl example for /v1/detect")


@pytest.fixture(scope="module")
def gateway():
    if not all((REPO / m / "1" / "model.onnx").is_file() for m in ("text_encoder", "detector")):
        pytest.skip("model_repository has no ONNX files: run `make export`")
    app = create_app(Settings(repository=REPO, backend="embedded", api_key=None))
    with serve_in_thread(app) as base:
        yield base.removeprefix("http://")


def _readme_layout(r: dict) -> str:
    """The response in the README's layout (one detection per line)."""
    res = r["results"][0]
    dets = ",\n".join(f"    {json.dumps(d)}" for d in res["detections"])
    return (f'{{"model": {json.dumps(r["model"])}, "results": [{{"width": {res["width"]}, "height": {res["height"]},\n'
            f'  "prompt": {json.dumps(res["prompt"])},\n  "phrases": {json.dumps(res["phrases"])},\n'
            f'  "detections": [\n{dets}]}}],\n "timings": {json.dumps(r["timings"])}}}')


def test_readme_curl_example_answers_what_the_readme_shows(gateway):
    command, shown = _readme_blocks()
    out = subprocess.run(["bash", "-c", command.replace("localhost:8000", gateway)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    for r in (got, shown):
        for d in r["results"][0]["detections"]:
            d["box"] = [round(v, 2) for v in d["box"]]
            d["score"] = round(d["score"], 4)
    new = _readme_layout(got)
    assert set(got["timings"]) == set(shown["timings"]), new
    assert {k: v for k, v in got.items() if k != "timings"} == {k: v for k, v in shown.items() if k != "timings"}, \
        f"the README's example answer is stale; the server now answers:\n{new}"


def test_one_default_score_threshold_everywhere(gateway, capsys):
    """The API, /v1/models, the demo page and the CLI share the exported default."""
    import base64

    from glipv2.postprocess import SERVING_SCORE_THRESHOLD
    from service.cli import main as cli

    base = f"http://{gateway}"
    default = httpx.get(base + "/v1/models", timeout=10).json()["postprocess"]["score_threshold"]
    assert default == SERVING_SCORE_THRESHOLD
    page = httpx.get(base + "/", timeout=10).text
    assert re.search(r'id="threshold"[^>]*value="([\d.]+)"', page).group(1) == f"{default:.2f}"

    prompt = "orange star. red triangle. square. blue circle."
    image = base64.b64encode((ROOT / "docs" / "example.jpg").read_bytes()).decode()

    def detect(**kw) -> list[dict]:
        body = {"images": [{"image": image, "prompt": prompt}], **kw}
        return httpx.post(base + "/v1/detect", json=body, timeout=60).json()["results"][0]["detections"]

    api = detect()
    assert api == detect(score_threshold=default) and all(d["score"] > default for d in api)
    assert len(detect(score_threshold=0.05)) > len(api)  # the default is not GLIP's evaluation 0.05
    assert cli(["detect", str(ROOT / "docs" / "example.jpg"), "-p", prompt, "-r", str(REPO), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["score_threshold"] == default
    assert [(d["phrase"], round(d["score"], 2)) for d in shown["detections"]] == \
        [(d["phrase"], round(d["score"], 2)) for d in api]


def test_api_docs_say_what_vqa_can_and_cannot_answer():
    """No answerability estimate exists, so the API docs say what the scores mean."""
    from fastapi.testclient import TestClient

    schema = TestClient(create_app(Settings(repository=REPO, api_key=None))).get("/openapi.json").json()
    for path in ("/v1/vqa", "/v1/vqa/upload"):
        text = schema["paths"][path]["post"]["description"]
        assert "What it cannot" in text and "is there a dog?" in text and "not that the question" in text, path
    score = schema["components"]["schemas"]["VqaResult"]["properties"]["score"]["description"]
    assert "not that the question is answerable" in score
