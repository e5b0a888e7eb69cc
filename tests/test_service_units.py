"""Gateway parts without the model: settings, image decoding, the micro-batcher, and the
gateway's freedom from torch."""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.batcher import MicroBatcher
from service.errors import BackendUnavailable, InvalidInput, Overloaded, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from service.images import decode_base64, decode_image
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_service_does_not_import_torch():
    code = (
        "import sys\n"
        "import service.app, service.__main__, service.backends.embedded\n"
        "from service.app import create_app\n"
        "create_app()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# -------------------------------------------------------------------------------- settings


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("GLIPV2_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("GLIPV2_BACKEND", "triton")
    monkeypatch.setenv("GLIPV2_API_KEY", "a-real-key")
    s = Settings()
    assert s.max_batch_size == 16 and s.backend == "triton"
    assert s.api_key.get_secret_value() == "a-real-key" and "a-real-key" not in repr(s)


@pytest.mark.parametrize("bad", [{"max_batch_size": 0}, {"backend": "tensorflow"}, {"api_key": "changeme"},
                                 {"max_wait_ms": -1}])
def test_settings_refuse_bad_values(bad):
    with pytest.raises(ValueError):
        Settings(**bad)


# ---------------------------------------------------------------------------------- images


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, kw", [("PNG", {}), ("JPEG", {"quality": 95}), ("WEBP", {"lossless": True})])
def test_decode_formats(fmt, kw):
    arr = np.zeros((20, 30, 3), np.uint8)
    arr[:, :15] = (255, 0, 0)
    out = decode_image(_encode(Image.fromarray(arr), fmt, **kw), max_pixels=10_000)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert abs(int(out[10, 5, 0]) - 255) < 10 and int(out[10, 25, 0]) < 10


def test_decode_grey_and_rgba_become_rgb():
    assert decode_image(_encode(Image.new("L", (8, 8), 7), "PNG"), 100).shape == (8, 8, 3)
    assert decode_image(_encode(Image.new("RGBA", (8, 8)), "PNG"), 100).shape == (8, 8, 3)


def test_decode_errors():
    with pytest.raises(UnsupportedMediaType):
        decode_image(_encode(Image.new("RGB", (8, 8)), "GIF"), 100)
    with pytest.raises(UnsupportedMediaType):
        decode_image(b"\x89PNG but not really", 100)
    with pytest.raises(PayloadTooLarge):
        decode_image(_encode(Image.new("RGB", (11, 10)), "PNG"), 100)
    with pytest.raises(InvalidInput):
        decode_image(_encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")[:60], 10_000)


def test_decode_base64():
    raw = b"\x00\x01binary"
    enc = base64.b64encode(raw).decode()
    assert decode_base64(enc) == raw
    assert decode_base64("data:image/png;base64," + enc) == raw
    assert decode_base64(enc[:4] + "\n" + enc[4:]) == raw
    for bad in ("***", "abc", ""):
        with pytest.raises(InvalidInput):
            decode_base64(bad)
    with pytest.raises(PayloadTooLarge):
        decode_base64(base64.b64encode(b"x" * 1000).decode(), max_bytes=100)


# --------------------------------------------------------------------------------- batcher


def _run(coro):
    return asyncio.run(coro)


def test_batcher_groups_concurrent_items_and_keeps_order():
    calls = []

    def run(batch):
        calls.append(list(batch))
        return [x * 10 for x in batch]

    async def main():
        b = MicroBatcher(run, max_batch_size=4, max_wait_ms=50, queue_size=100)
        await b.start()
        results = await asyncio.gather(*(b.submit(i) for i in range(10)))
        many = await b.submit_many([100, 200, 300])
        await b.stop()
        return b, results, many

    b, results, many = _run(main())
    assert [r.value for r in results] == [i * 10 for i in range(10)]
    assert [r.value for r in many] == [1000, 2000, 3000]
    assert [len(c) for c in calls] == [4, 4, 2, 3]
    assert b.batches == 4 and b.items == 13 and b.max_batch_seen == 4
    assert all(r.batch_size == 4 for r in results[:8])


def test_batcher_queue_full_all_or_nothing():
    def run(batch):
        time.sleep(0.2)
        return batch

    async def main():
        b = MicroBatcher(run, max_batch_size=1, max_wait_ms=0, queue_size=3)
        await b.start()
        first = asyncio.create_task(b.submit_many([1, 2]))
        await asyncio.sleep(0)  # queued
        with pytest.raises(Overloaded) as info:
            await b.submit_many([3, 4])
        assert info.value.headers["Retry-After"] == "1"
        ok = await b.submit(5)  # one more still fits
        await first
        await b.stop()
        return ok, b

    ok, b = _run(main())
    assert ok.value == 5 and b.items == 3


def test_batcher_timeout_skips_expired_items():
    def run(batch):
        time.sleep(0.3)
        return batch

    async def main():
        b = MicroBatcher(run, max_batch_size=1, max_wait_ms=0, queue_size=10, timeout_s=0.1)
        await b.start()
        slow = asyncio.create_task(b.submit(1))
        await asyncio.sleep(0)
        with pytest.raises(RequestTimeout):
            await b.submit(2)  # waits behind item 1, times out
        with pytest.raises(RequestTimeout):
            await slow
        await b.stop()
        return b

    b = _run(main())
    assert b.skipped == 1  # item 2 never ran


def test_batcher_failure_reaches_every_item_and_worker_survives():
    state = {"fail": True}

    def run(batch):
        if state["fail"]:
            state["fail"] = False
            raise BackendUnavailable("boom")
        return batch

    async def main():
        b = MicroBatcher(run, max_batch_size=4, max_wait_ms=20, queue_size=10)
        await b.start()
        results = await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)
        after = await b.submit(3)
        await b.stop()
        return results, after

    results, after = _run(main())
    assert all(isinstance(r, BackendUnavailable) for r in results) and after.value == 3


def test_batcher_stop_drains_queued_items_and_then_refuses():
    def run(batch):
        time.sleep(0.05)
        return batch

    async def main():
        b = MicroBatcher(run, max_batch_size=2, max_wait_ms=0, queue_size=10)
        await b.start()
        tasks = [asyncio.create_task(b.submit(i)) for i in range(5)]
        await asyncio.sleep(0)
        await b.stop()
        with pytest.raises(BackendUnavailable):
            await b.submit(99)
        return [r.value for r in await asyncio.gather(*tasks)]

    assert _run(main()) == [0, 1, 2, 3, 4]


def test_python_m_service_serves_and_shuts_down_gracefully(tmp_path):
    """The real uvicorn server over a real socket: ready, one detection, SIGTERM -> exit 0."""
    import json
    import os
    import signal
    import socket
    import urllib.request

    if not (ROOT / "model_repository" / "detector" / "1" / "model.onnx").is_file():
        pytest.skip("model_repository has no ONNX files: run `make export`")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GLIPV2_PORT": str(port), "GLIPV2_REPOSITORY": str(ROOT / "model_repository"),
           "GLIPV2_THREADS": "2", "GLIPV2_LOG_LEVEL": "info"}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(150):
            try:
                with urllib.request.urlopen(url + "/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("server not ready in 15 s:\n" + (tmp_path / "server.log").read_text())
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "PNG")
        body = json.dumps({"images": [{"image": base64.b64encode(buf.getvalue()).decode(), "prompt": "red circle."}]})
        req = urllib.request.Request(url + "/v1/detect", data=body.encode(), headers={
            "content-type": "application/json", "x-request-id": "it-is-me"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200 and r.headers["x-request-id"] == "it-is-me"
            assert json.loads(r.read())["results"][0]["width"] == 64
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        log.close()
    text = (tmp_path / "server.log").read_text()
    # uvicorn re-raises the signal after its graceful shutdown (newer versions): -15 is a clean exit too
    assert code in (0, -signal.SIGTERM), text
    assert "Application shutdown complete" in text
    assert "[it-is-me]" in text  # the request id is in the gateway's log lines


def test_triton_settings_reach_the_backend(monkeypatch):
    """GLIPV2_TRITON_HTTP_URL is the HTTP fallback of the backend the app builds."""
    from service.backends import create_backend

    monkeypatch.setenv("GLIPV2_BACKEND", "triton")
    monkeypatch.setenv("GLIPV2_TRITON_URL", "127.0.0.1:1")
    monkeypatch.setenv("GLIPV2_TRITON_HTTP_URL", "127.0.0.1:2")
    backend = create_backend(Settings())
    try:
        assert backend.http_url == "127.0.0.1:2"
        assert len(backend.protocols) == 2
    finally:
        backend.close()


def test_loop_lag_probe_sees_a_blocked_loop():
    """The /metrics loop-lag probe: a callback that holds the event loop for 0.4 s shows up
    as a sample over 0.25 s (and as the worst lag), which an idle loop's samples are not."""
    import re

    from service.looplag import LoopLagProbe

    async def run():
        probe = LoopLagProbe(interval_s=0.01)
        probe.start()
        await asyncio.sleep(0.1)
        idle_max = probe.max_s
        time.sleep(0.4)  # blocks the loop, as CPU work on it would
        await asyncio.sleep(0.05)
        await probe.stop()
        return probe, idle_max

    probe, idle_max = asyncio.run(run())
    assert probe.max_s >= 0.35 and idle_max < 0.25, (probe.max_s, idle_max)
    text = "\n".join(probe.render())
    under = int(re.search(r'glipv2_event_loop_lag_seconds_bucket\{le="0.25"\} (\d+)', text).group(1))
    assert under < probe.n and f"glipv2_event_loop_lag_seconds_count {probe.n}" in text, text
