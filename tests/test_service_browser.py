"""The demo page at / in a real headless browser (Debian's chromium + chromedriver,
`make browser` installs them): the real app under uvicorn on a free localhost port, the
embedded ONNX Runtime backend on the demo model in model_repository/ (exported first when
its ONNX files are missing). A freshly rendered shapes-world image is uploaded, Detect is
clicked, and the canvas screenshot must show the returned boxes: the stroke colour along
every box edge, where the source image has none of it, and the image itself elsewhere.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from glipv2.boxes import box_iou
from service.app import create_app
from service.settings import Settings
from tests.live_server import serve_in_thread
from training.shapes_world import SHAPES, render, sample_scene

ROOT = Path(__file__).resolve().parents[1]
REPO = ROOT / "model_repository"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
STROKE = np.array([0, 255, 255])  # BOX_COLOUR in service/static/demo.js
PROMPT = "circle. square. triangle. star. hexagon. cross."
PAGE_IDS = ("detect-form", "image", "prompt", "threshold", "threshold-value", "api-key", "detect",
            "status", "error", "canvas", "results", "results-body", "question", "ask", "beam",
            "caption-button", "answer", "caption")


def _model_files_present() -> bool:
    return (REPO / "tokenizer.json").is_file() and all(
        (REPO / m / "1" / "model.onnx").is_file() for m in ("text_encoder", "detector", "vqa", "caption_step"))


@pytest.fixture(scope="module")
def server():
    """The real app (create_app, default settings on model_repository/) served by uvicorn in
    a thread, on a socket bound to a free port; yields the base URL."""
    if not _model_files_present():  # a fresh clone: render the repository from the demo checkpoint
        subprocess.run([sys.executable, "-m", "export.build", "--checkpoint", str(ROOT / "demo" / "tiny.pt"),
                        "--out", str(REPO)], cwd=ROOT, check=True)
    app = create_app(Settings(repository=REPO, backend="embedded", api_key=None))
    with serve_in_thread(app) as base:
        yield base


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"{', '.join(missing)} missing: run `make browser` (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--force-device-scale-factor=1", "--window-size=1280,1400",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _scene_png(path: Path, seed: int):
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng)
    img = render(scene, rng)
    Image.fromarray(img).save(path)
    return scene, img


def _submit(driver, base: str, image: Path, timeout: float = 60.0) -> str:
    """Loads the page, chooses the file, clicks Detect; returns the page's final state
    ('done' or 'error', set on <body data-state>)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(base + "/")
    driver.find_element(By.ID, "image").send_keys(str(image))
    driver.find_element(By.ID, "detect").click()
    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def _near_stroke(pixels: np.ndarray, tol: int = 40) -> np.ndarray:
    return np.abs(pixels.astype(int) - STROKE).max(axis=-1) <= tol


def test_page_is_served(server):
    r = httpx.get(server + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for element_id in PAGE_IDS:
        assert f'id="{element_id}"' in r.text, element_id
    assert PROMPT in r.text
    assert "/v1/detect/upload" in httpx.get(server + "/static/demo.js", timeout=10).text
    assert httpx.get(server + "/static/demo.css", timeout=10).status_code == 200
    assert httpx.get(server + "/static/app.py", timeout=10).status_code == 404
    assert "//" not in r.text.replace("http://www.w3.org", "")  # nothing from another origin (no CDN)


def test_browser_draws_detected_boxes(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    scene, img = _scene_png(tmp_path / "scene.png", seed=20261125)
    state = _submit(browser, server, tmp_path / "scene.png")
    assert state == "done", browser.find_element(By.ID, "error").text

    rows = browser.find_elements(By.CSS_SELECTOR, "#results-body tr.detection")
    assert rows, "the results table lists no detections"
    boxes = np.array([json.loads(r.get_attribute("data-box")) for r in rows], dtype=float)
    phrases = [r.find_element(By.CSS_SELECTOR, "td.phrase").text for r in rows]
    scores = [float(r.get_attribute("data-score")) for r in rows]
    assert set(phrases) <= set(SHAPES) and min(scores) >= 0.3  # the slider's default threshold
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    # The boxes are the model's, on this image: most objects are found.
    gt = np.array([o.box for o in scene.objects], dtype=float)
    iou = np.asarray(box_iou(gt, boxes))
    assert (iou.max(axis=1) > 0.5).mean() >= 0.5, (gt, boxes)

    canvas = browser.find_element(By.ID, "canvas")
    png = canvas.screenshot_as_png
    (tmp_path / "canvas.png").write_bytes(png)
    shot = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    h, w = img.shape[:2]
    assert abs(shot.shape[1] - w) <= 1 and abs(shot.shape[0] - h) <= 1, (shot.shape, img.shape)
    shot = shot[:h, :w]
    sx, sy = shot.shape[1] / w, shot.shape[0] / h

    # Every box: along its left, right and bottom edges (the top carries the label) the
    # canvas shows the stroke colour (within 1 px of the edge) where the source image
    # does not. The boxes come from the page's own table, scaled to the screenshot.
    hits = []
    for x0, y0, x1, y1 in boxes:
        cx0, cx1 = int(np.clip(x0 * sx, 1, w - 2)), int(np.clip(x1 * sx, 1, w - 2))
        cy0, cy1 = int(np.clip(y0 * sy, 1, h - 2)), int(np.clip(y1 * sy, 1, h - 2))
        ys = np.linspace(cy0 + 3, cy1 - 3, 12).astype(int) if cy1 - cy0 > 8 else np.array([(cy0 + cy1) // 2])
        xs = np.linspace(cx0 + 3, cx1 - 3, 12).astype(int) if cx1 - cx0 > 8 else np.array([(cx0 + cx1) // 2])
        on_edge = ([_near_stroke(shot[y, cx - 1:cx + 2]).any() for cx in (cx0, cx1) for y in ys]  # vertical
                   + [_near_stroke(shot[cy1 - 1:cy1 + 2, x]).any() for x in xs])  # bottom edge
        hits.append(np.mean(on_edge))
    assert min(hits) >= 0.6 and np.mean(hits) >= 0.85, hits
    assert _near_stroke(img).mean() < 0.001  # the stroke colour is not in the source image

    # Away from the boxes and labels the canvas is the image itself, at its own resolution.
    mask = np.ones((h, w), bool)
    for x0, y0, x1, y1 in boxes:
        mask[max(int(y0) - 24, 0):int(y1) + 6, max(int(x0) - 6, 0):int(x1) + 6] = False
    if mask.mean() > 0.05:
        diff = np.abs(shot.astype(int) - img.astype(int)).max(axis=-1)[mask]
        assert np.median(diff) <= 2 and (diff > 24).mean() < 0.01


def test_browser_shows_api_error(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    (tmp_path / "not-an-image.png").write_bytes(b"this is text, not a PNG")
    assert _submit(browser, server, tmp_path / "not-an-image.png") == "error"
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed()
    direct = httpx.post(server + "/v1/detect/upload", data={"prompt": PROMPT},
                        files={"image": ("x.png", b"this is text, not a PNG", "image/png")}, timeout=30)
    assert direct.status_code in (415, 422) and error.text == direct.json()["detail"]
    assert browser.find_element(By.ID, "results").get_attribute("hidden") is not None


def test_browser_asks_and_captions(server, browser, tmp_path):
    """Ask about the uploaded image and caption it: the page shows what the API answers."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    scene, _ = _scene_png(tmp_path / "scene.png", seed=11)
    question = f"how many {scene.objects[0].shape}s are there?".replace("crosss", "crosses")
    browser.get(server + "/")
    browser.find_element(By.ID, "image").send_keys(str(tmp_path / "scene.png"))
    box = browser.find_element(By.ID, "question")
    box.clear()
    box.send_keys(question)

    def run(button: str, target: str, prefix: str) -> str:
        browser.find_element(By.ID, button).click()
        WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, target).text.startswith(prefix)
                                         or d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error")
        assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", \
            browser.find_element(By.ID, "error").text
        return browser.find_element(By.ID, target).text

    png = (tmp_path / "scene.png").read_bytes()
    shown = run("ask", "answer", "Answer: ")
    direct = httpx.post(server + "/v1/vqa/upload", data={"question": question, "top_k": "3"},
                        files={"image": ("s.png", png, "image/png")}, timeout=30).json()["results"][0]
    assert shown.startswith(f"Answer: {direct['answer']} ")
    shown = run("caption-button", "caption", "Caption: ")
    direct = httpx.post(server + "/v1/caption/upload", files={"image": ("s.png", png, "image/png")},
                        timeout=30).json()["results"][0]
    assert shown == "Caption: " + direct["caption"]


def test_swagger_ui_renders_without_a_cdn(server, browser):
    """/docs draws the API's operations from files the gateway serves (this machine has no
    internet, so a CDN script would leave the page blank)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/docs")
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock"))
    text = browser.find_element(By.TAG_NAME, "body").text
    assert "/v1/detect" in text and "/v1/models" in text
