"""glipv2.phrases (rule-based noun-phrase chunker) and POST /v1/ground with phrases found
automatically (real app, real ONNX Runtime on model_repository/)."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glipv2.phrases import noun_phrases, phrases_of

REPO = Path(__file__).resolve().parents[1] / "model_repository"
HAS_ONNX = all((REPO / m / "1" / "model.onnx").is_file() for m in ("text_encoder", "detector"))


@pytest.mark.parametrize("caption, expected", [
    ("a red circle to the left of a blue star and a green cross", ["red circle", "blue star", "green cross"]),
    ("a red circle right of a blue star", ["red circle", "blue star"]),
    ("Two large blue stars are above a small yellow hexagon.", ["large blue stars", "small yellow hexagon"]),
    ("the green square is below the red triangle", ["green square", "red triangle"]),
    ("a hexagon next to a cross, with a circle on it", ["hexagon", "cross", "circle"]),
    ("red circle. star.", ["red circle", "star"]),
    ("some purple crosses in front of the large blue star", ["purple crosses", "large blue star"]),
    ("a man riding a red bike next to the old bridge", ["man", "red bike", "old bridge"]),
    ("a woman holding an umbrella in front of the building", ["woman", "umbrella", "building"]),
    ("the cat sits on a wooden table with two cups", ["cat", "wooden table", "cups"]),
    ("a dog, a cat; and three birds sitting on the ceiling", ["dog", "cat", "birds", "ceiling"]),
    ("the circle on the left", ["circle"]),
    ("the top shelf has a very old clock", ["top shelf", "old clock"]),
    ("i see a red circle and a blue star", ["red circle", "blue star"]),
])
def test_noun_phrases(caption, expected):
    assert phrases_of(caption) == expected
    spans = noun_phrases(caption)
    assert [caption[s:e] for s, e in spans] == expected
    assert all(0 <= s < e <= len(caption) for s, e in spans)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # ordered, not overlapping


@pytest.mark.parametrize("caption", ["", "   ", "and the", "it is on the left of them", "!!! ... ,,,", "is there"])
def test_no_noun_phrases(caption):
    assert noun_phrases(caption) == []


def test_phrases_is_torch_free():
    code = "import sys, glipv2.phrases; assert 'torch' not in sys.modules and 'nltk' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------- /v1/ground, automatic


def _b64(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def client():
    if not HAS_ONNX:
        pytest.skip("model_repository has no ONNX files: run `make export`")
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    with TestClient(create_app(Settings(repository=REPO, threads=2, max_wait_ms=0.0))) as c:
        yield c


def test_ground_automatic_phrases(client):
    from glipv2.boxes import box_iou
    from training.shapes_world import render, sample_scene

    rng = np.random.default_rng(11)
    items, truth = [], []
    while len(items) < 4:
        scene = sample_scene(rng)
        img = render(scene, rng)
        objs = scene.objects[:3]
        rel = [" to the left of ", " and ", " next to "]
        caption = "a " + objs[0].colour + " " + objs[0].shape
        for k, o in enumerate(objs[1:]):
            caption += rel[k] + f"the {o.colour} {o.shape}"
        items.append({"image": _b64(img), "caption": caption})
        truth.append(objs)
    r = client.post("/v1/ground", json={"images": items})
    assert r.status_code == 200, r.text
    hits = total = 0
    for res, objs, item in zip(r.json()["results"], truth, items):
        assert res["phrases_source"] == "automatic"
        assert res["phrases"] == [f"{o.colour} {o.shape}" for o in objs]
        assert [item["caption"][s:e] for (s, e), in res["phrase_spans"]] == res["phrases"]
        for p, obj in enumerate(objs):
            total += 1
            best = [d for d in res["detections"] if d["phrase_index"] == p][:1]
            if best and box_iou(np.array([obj.box], np.float32), np.array([best[0]["box"]], np.float32))[0, 0] > 0.5:
                hits += 1
    assert hits / total >= 0.6, f"recall@1 {hits}/{total}"


def test_ground_given_spans_reported(client):
    img = np.full((64, 64, 3), 230, np.uint8)
    caption = "a red circle and a star"
    r = client.post("/v1/ground", json={"images": [{"image": _b64(img), "caption": caption,
                                                     "phrases": [[2, 12], [[19, 23]]]}]})
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert res["phrases_source"] == "given"
    assert res["phrases"] == ["red circle", "star"] and res["phrase_spans"] == [[[2, 12]], [[19, 23]]]


def test_ground_caption_without_noun_phrase_422(client):
    img = np.full((64, 64, 3), 230, np.uint8)
    r = client.post("/v1/ground", json={"images": [{"image": _b64(img), "caption": "it is on the left"}]})
    assert r.status_code == 422
    assert "no noun phrase" in r.json()["detail"]


@pytest.mark.parametrize("phrase, head", [
    ("the yellow circle above the green star", "yellow circle"),
    ("a man riding a red bike next to the old bridge", "man"),
    ("circle left of the star", "circle"),
    ("large red circle", None),  # one noun phrase: all of it is the object
    ("red circle and blue star", None),  # a list of objects, not a relation
    ("cats, dogs", None),
    ("left of", None),
])
def test_head_phrase(phrase, head):
    from glipv2.phrases import head_phrase

    span = head_phrase(phrase)
    assert (phrase[span[0]:span[1]] if span else None) == head


def test_head_tokens_score_a_relation_phrase():
    """phrase_tokens "head": a relation phrase's positive map covers its head noun phrase's
    tokens only; other phrases, and phrases in several spans, keep all theirs."""
    from glipv2.text import Tokenizer, prompt_from_spans, tokenize

    text = "the yellow circle above the green star. large red circle. red circle and blue star."
    prompt = prompt_from_spans(text, [[[0, 38]], [[40, 56]], [[58, 82]], [[4, 10], [28, 33]]])
    every, head = (tokenize(Tokenizer(), prompt, which) for which in ("all", "head"))
    tok = Tokenizer()

    def words(pm_row, tp):
        return tok.decode(tp.input_ids[pm_row.astype(bool)])

    assert words(every.positive_map[0], every) == "the yellow circle above the green star"
    assert words(head.positive_map[0], head) == "yellow circle"
    assert (head.positive_map[1:] == every.positive_map[1:]).all()
    assert head.prompt is prompt  # the caller's spans are what responses report


@pytest.mark.skipif(not HAS_ONNX, reason="model_repository has no ONNX files: run `make export`")
def test_relation_phrases_box_the_object_they_are_about(client):
    """/v1/ground with a relation phrase as one span ("the yellow circle above the green
    star", the shapes world's relation phrases on fresh scenes): the served demo model
    scores it by its head noun phrase (phrase_tokens "head"), so its top box is the same as
    for the head's span alone, and it is the object the phrase denotes."""
    from glipv2.boxes import box_iou
    from glipv2.phrases import head_phrase
    from training.shapes_world import relation_phrases, render, sample_scene

    hits = total = 0
    for i in range(40):
        rng = np.random.default_rng([2033, i])
        scene = sample_scene(rng)
        phrases = [p for p in relation_phrases(scene, rng, 2) if p.objects]
        if not phrases:
            continue
        text = phrases[0].text
        s, e = head_phrase(text)
        img = _b64(render(scene, rng))
        whole, head = (client.post("/v1/ground", json={"images": [{"image": img, "caption": text,
                                                                    "phrases": [span]}]}).json()["results"][0]
                       for span in ([0, len(text)], [s, e]))
        assert whole["phrase_spans"] == [[[0, len(text)]]]
        assert [d["box"] for d in whole["detections"][:1]] == [d["box"] for d in head["detections"][:1]], text
        total += 1
        top = whole["detections"][:1]
        gt = np.array([scene.objects[k].box for k in phrases[0].objects], np.float32)
        hits += bool(top) and box_iou(np.array([top[0]["box"]], np.float32), gt).max() >= 0.5
    print(f"relation phrases: {hits} of {total} boxed on the object they denote")
    assert total >= 20 and hits / total >= 0.85, f"{hits} of {total}"
