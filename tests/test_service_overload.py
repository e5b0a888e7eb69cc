"""Overload, big images and slow clients against the real gateway (issue 14, findings 2,
4, 6, 8): admission at the door (503 + Retry-After on the headers, before any body is
read or image decoded), the body-bytes budget, the request deadline covering decoding,
readiness during a decoding flood, and header/body deadlines on a real uvicorn socket.

The app is the real one (create_app + lifespan, embedded ONNX Runtime); where a request
must stay in flight, the backend is the real EmbeddedBackend slowed by a sleep in its
batch call. Every test is bounded to a few seconds."""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import json
import math
import socket
import threading
import time

import httpx
import pytest
from PIL import Image

from service.app import create_app
from service.images import decode_letterboxed
from service.backends.embedded import EmbeddedBackend
from tests.live_server import wait_until_ok
from tests.test_service import REPO, _settings, pytestmark  # noqa: F401 (skip without ONNX files)


def _png(side: int, colour=(10, 200, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


SMALL = _png(64)
BIG = _png(2000)  # 16 KB of PNG, 4 Mpx decoded (about 0.1-0.3 s on the 2-core CPU)


class _Slow(EmbeddedBackend):
    """The real backend, each batch held for `delay` seconds."""

    delay = 1.0

    def run_batch(self, items):
        time.sleep(self.delay)
        return super().run_batch(items)


async def _with_app(app, fn):
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=60) as ac:
            return await fn(ac)


async def _timed(coro):
    t0 = time.perf_counter()
    r = await coro
    return r, time.perf_counter() - t0


def _detect_body(image: str, n: int = 1) -> dict:
    return {"images": [{"image": image, "prompt": "circle."}] * n}


# ---------------------------------------------------------- finding 4: shed at the door

def test_overload_is_shed_at_the_door():
    """With 3 requests in progress (GLIPV2_MAX_CONCURRENT_REQUESTS=3), 20 more are answered
    503 + Retry-After at once, each in a fraction of the held requests' second, without their bodies being decoded (they
    carry a corrupt image: decoding it would be a 422)."""
    app = create_app(_settings(max_concurrent_requests=3, retry_after_s=2, max_wait_ms=0.0),
                     backend=_Slow(REPO))

    async def run(ac):
        held = [asyncio.create_task(ac.post("/v1/detect", json=_detect_body(SMALL))) for _ in range(3)]
        await asyncio.sleep(0.3)
        corrupt = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 40).decode()
        shed = [await _timed(ac.post("/v1/detect", json=_detect_body(corrupt))) for _ in range(20)]
        stats = (await ac.get("/v1/stats")).json()
        return [r.status_code for r in await asyncio.gather(*held)], shed, stats

    held, shed, stats = asyncio.run(_with_app(app, run))
    assert held == [200] * 3
    assert [r.status_code for r, _ in shed] == [503] * 20, [r.text for r, _ in shed][:2]
    assert all(r.headers["retry-after"] == "2" for r, _ in shed)
    # well under the 1 s the held requests take (an absolute 50 ms failed at load 10 on
    # 2 cores; the subprocess test below times the protocol layer's door the same way)
    assert max(t for _, t in shed) < 0.25, sorted(t for _, t in shed)[-3:]
    assert stats["admission"]["shed"] == 20 and stats["admission"]["in_flight"] == 3  # the held ones


def test_the_startup_heap_is_frozen_while_serving():
    """What the server loaded at startup (the model, FastAPI, ...) is moved out of the garbage
    collector's sight while it serves (gc.freeze), so that a full collection under load
    scans only what requests allocate: full collections of the whole heap stalled the
    event loop 80-385 ms, and every 503 with it (open-loop 503 p99 380 ms). Shutdown gives
    the objects back (apps come and go in one process: tests, reloads)."""
    app = create_app(_settings())

    async def run(ac):
        assert (await ac.post("/v1/detect", json=_detect_body(SMALL))).status_code == 200
        return gc.get_freeze_count(), len(gc.get_objects())

    frozen, tracked = asyncio.run(_with_app(app, run))
    assert frozen > 5 * tracked, (frozen, tracked)
    assert gc.get_freeze_count() == 0


def test_body_bytes_in_flight_are_bounded():
    """GLIPV2_MAX_BODY_MB_IN_FLIGHT=1: with one 700 KB request in progress a second is
    refused on its Content-Length (503), a small one still gets in."""
    app = create_app(_settings(max_body_mb_in_flight=1, max_wait_ms=0.0), backend=_Slow(REPO))
    padded = (json.dumps(_detect_body(SMALL)) + " " * 700_000).encode()  # a large body, cheap to handle
    headers = {"Content-Type": "application/json"}

    async def run(ac):
        first = asyncio.create_task(ac.post("/v1/detect", content=padded, headers=headers))
        await asyncio.sleep(0.3)
        second = await ac.post("/v1/detect", content=padded, headers=headers)
        small = await ac.post("/v1/detect", json=_detect_body(SMALL))
        return (await first).status_code, second, small.status_code

    first, second, small = asyncio.run(_with_app(app, run))
    assert first == 200
    assert second.status_code == 503 and "body bytes" in second.json()["detail"], second.text
    assert "retry-after" in second.headers
    assert small == 200


# ------------------------------------------------ finding 2: decoding under the deadline

def test_request_deadline_covers_decoding():
    """4-Mpx images with one decode thread, enough of them to take three times the 0.3 s
    request timeout on this machine: 504 at about the deadline (decoding used to run outside
    it: 200 after seconds)."""
    raw = base64.b64decode(BIG)
    t0 = time.perf_counter()
    decode_letterboxed(raw, 5_000_000, (256, 256))
    n = min(256, max(8, math.ceil(3 * 0.3 / (time.perf_counter() - t0))))  # CI decoded 8 in 0.23 s
    app = create_app(_settings(request_timeout_s=0.3, decode_threads=1, max_image_pixels=5_000_000,
                               max_images_per_request=n))

    async def run(ac):
        return await _timed(ac.post("/v1/detect", json=_detect_body(BIG, n)))

    r, seconds = asyncio.run(_with_app(app, run))
    assert r.status_code == 504, (n, r.text[-300:])
    assert seconds < 0.3 + 0.5, seconds


def test_readiness_answers_during_a_decoding_flood():
    """Six requests of eight 4-Mpx images each (48 decodes for one decode thread):
    meanwhile /health/ready answers within a second. Decoding used to share the default
    thread pool with the readiness check (which failed for 20 s in the issue; here it timed
    out, 503 after 6.6 s, before the fix and answered in 0.4-0.6 s after, on the shared
    2-core CPU)."""
    app = create_app(_settings(request_timeout_s=2.5, decode_threads=1, max_image_pixels=5_000_000,
                               max_images_per_request=8))

    async def run(ac):
        flood = [asyncio.create_task(ac.post("/v1/detect", json=_detect_body(BIG, 8))) for _ in range(6)]
        await asyncio.sleep(0.3)
        ready = await _timed(ac.get("/health/ready"))
        codes = [r.status_code for r in await asyncio.gather(*flood)]
        return ready, codes

    (ready, ready_s), codes = asyncio.run(_with_app(app, run))
    assert ready.status_code == 200 and ready_s < 1.0, (ready.status_code, ready_s)
    assert set(codes) <= {200, 504}, codes


# ---------------------------------------------- finding 6: slow headers and slow bodies

@pytest.fixture(scope="module")
def live_server():
    """The real app under uvicorn with the gateway's protocol (service.__main__), on a free
    localhost port, header and body deadlines of 1 s."""
    import uvicorn

    from service.__main__ import uvicorn_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = _settings(port=port, header_timeout_s=1.0, body_timeout_s=1.0, log_level="warning")
    server = uvicorn.Server(uvicorn_config(settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield port
    server.should_exit = True
    thread.join(timeout=10)


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes | None = None) -> tuple[bool, bytes]:
    """Whether the server closes sock within `seconds` (sending `trickle` every 0.2 s);
    returns (closed, what the server sent)."""
    sock.settimeout(0.2)
    got, end = b"", time.time() + seconds
    while time.time() < end:
        try:
            if trickle:
                sock.sendall(trickle)
            data = sock.recv(4096)
            if not data:
                return True, got
            got += data
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True, got
    return False, got


def test_slow_headers_are_cut_off(live_server):
    """20 connections trickling header bytes (each byte within uvicorn's keep-alive timer)
    and one silent connection: all closed with a 408 by the 1 s header deadline."""
    socks = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", live_server))
        s.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: gw\r\n")
        socks.append(s)
    silent = socket.create_connection(("127.0.0.1", live_server))
    t0 = time.time()
    try:
        results = [_closed_within(s, 3.0, trickle=b"X-A: b\r\n") for s in socks[:3]]
        results += [_closed_within(s, 3.0 - (time.time() - t0)) for s in socks[3:] + [silent]]
    finally:
        for s in socks + [silent]:
            s.close()
    assert all(closed for closed, _ in results), [c for c, _ in results]
    assert all(got.startswith(b"HTTP/1.1 408") for _, got in results), results[0]
    assert time.time() - t0 < 3.0


def test_slow_body_is_cut_off(live_server):
    """A body arriving a byte at a time gets 408 at the 1 s body deadline."""
    s = socket.create_connection(("127.0.0.1", live_server))
    try:
        s.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{")
        t0 = time.time()
        closed, got = _closed_within(s, 3.0, trickle=b" ")
    finally:
        s.close()
    assert got.startswith(b"HTTP/1.1 408"), got
    assert time.time() - t0 < 2.5


def test_normal_keep_alive_requests_still_work(live_server):
    """The header deadline does not cut a healthy keep-alive client: three requests on one
    connection, the last after a pause shorter than the keep-alive time."""
    with httpx.Client(base_url=f"http://127.0.0.1:{live_server}", timeout=30) as c:
        for pause in (0.0, 0.5, 0.5):
            time.sleep(pause)
            assert c.post("/v1/detect", json=_detect_body(SMALL)).status_code == 200


# ------------------------------------------------------------------ SIGTERM drains in flight

def test_sigterm_drains_requests_in_flight(tmp_path):
    """`python -m service` gets SIGTERM while a request is decoding sixteen 4-Mpx images:
    that request still gets its 200, then the server exits cleanly."""
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GLIPV2_PORT": str(port), "GLIPV2_REPOSITORY": str(REPO), "GLIPV2_THREADS": "2",
           "GLIPV2_DECODE_THREADS": "1", "GLIPV2_MAX_IMAGE_PIXELS": "5000000", "GLIPV2_LOG_LEVEL": "info"}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO.parent, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ok(url + "/health/ready", timeout_s=60, alive=lambda: proc.poll() is None,
                      context=(tmp_path / "server.log").read_text)
        result: dict = {}

        def call():
            t0 = time.perf_counter()
            r = httpx.post(url + "/v1/detect", json=_detect_body(BIG, 16), timeout=60)
            result.update(status=r.status_code, seconds=time.perf_counter() - t0)

        t = threading.Thread(target=call)
        t.start()
        # Signal as soon as the gateway counts the request in progress (a fixed sleep lost
        # the race on a faster machine: the request had finished before the signal).
        deadline = time.monotonic() + 30
        while httpx.get(url + "/v1/stats").json()["admission"]["in_flight"] < 1:
            assert time.monotonic() < deadline and t.is_alive(), "the request never showed as in flight"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=60)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert result.get("status") == 200, (result, text[-2000:])
    # The server's own log orders the two events: the signal was handled before the
    # request's access line was written, so it was drained, not finished first.
    assert "Shutting down" in text and "POST /v1/detect 200" in text, text[-2000:]
    assert text.index("Shutting down") < text.index("POST /v1/detect 200"), text[-2000:]
    assert code in (0, -signal.SIGTERM)


# --------------------------------------- finding 4: the door in the protocol layer, timed

def _door_probe(port: int, key: str | None) -> tuple[bytes, float]:
    """Headers of a 5 MB inference request, never its body: (the answer's head, seconds
    from sending the headers to the whole head coming back)."""
    auth = f"X-API-Key: {key}\r\n" if key else ""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        t0 = time.perf_counter()
        s.sendall(f"POST /v1/detect HTTP/1.1\r\nHost: gw\r\n{auth}Content-Type: application/json\r\n"
                  "Content-Length: 5000000\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            data = s.recv(4096)
            if not data:
                break
            head += data
        return head, time.perf_counter() - t0


def test_door_sheds_in_the_protocol_layer_while_saturated(tmp_path):
    """`python -m service` (GLIPV2_MAX_CONCURRENT_REQUESTS=2, an API key) busy with two
    requests of eight 4-Mpx images (one decode thread: seconds of CPU work): requests
    that declare a 5 MB body and never send it get 503 + Retry-After from the protocol
    layer (counted as shed_at_door), each in under a quarter of the time the admitted
    requests took (a ratio, so a loaded CI machine slows both sides), and one without the
    key still gets its 401 first. The body is never read: waiting for it would have
    answered only at the 20 s body deadline."""
    import os
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = "door-test-key-4f1c"
    env = {**os.environ, "GLIPV2_PORT": str(port), "GLIPV2_REPOSITORY": str(REPO), "GLIPV2_THREADS": "2",
           "GLIPV2_DECODE_THREADS": "1", "GLIPV2_MAX_IMAGE_PIXELS": "5000000", "GLIPV2_MAX_CONCURRENT_REQUESTS": "2",
           "GLIPV2_API_KEY": key, "GLIPV2_RETRY_AFTER_S": "3", "GLIPV2_BODY_TIMEOUT_S": "20",
           "GLIPV2_REQUEST_TIMEOUT_S": "120", "GLIPV2_LOG_LEVEL": "warning"}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO.parent, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url, headers = f"http://127.0.0.1:{port}", {"X-API-Key": key}
    try:
        wait_until_ok(url + "/health/live", timeout_s=90, alive=lambda: proc.poll() is None,
                      context=(tmp_path / "server.log").read_text)
        httpx.post(url + "/v1/detect", json=_detect_body(SMALL), headers=headers, timeout=60)  # warm-up

        admitted: list = []

        def heavy():
            t0 = time.perf_counter()
            r = httpx.post(url + "/v1/detect", json=_detect_body(BIG, 8), headers=headers, timeout=120)
            admitted.append((r.status_code, time.perf_counter() - t0))

        threads = [threading.Thread(target=heavy) for _ in range(2)]
        for t in threads:
            t.start()
        stats_url = url + "/v1/stats"
        while httpx.get(stats_url, headers=headers, timeout=30).json()["admission"]["in_flight"] < 2:
            time.sleep(0.02)
        probes = []
        while len(admitted) == 0 and len(probes) < 20:
            probes.append(_door_probe(port, key))
        saturated = len(admitted) == 0  # the last probe was answered while both were in progress
        unauthenticated, _ = _door_probe(port, None)
        for t in threads:
            t.join(timeout=120)
        stats = httpx.get(stats_url, headers=headers, timeout=30).json()["admission"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    assert [code for code, _ in admitted] == [200, 200], admitted
    assert saturated and len(probes) >= 5, (len(probes), admitted)
    assert all(head.startswith(b"HTTP/1.1 503") and b"\r\nretry-after: 3\r\n" in head.lower()
               for head, _ in probes), probes[0][0]
    slowest, quickest_admitted = max(t for _, t in probes), min(t for _, t in admitted)
    assert slowest < quickest_admitted / 4, (sorted(t for _, t in probes)[-3:], admitted)
    assert stats["shed_at_door"] >= len(probes), stats  # by the protocol layer, not the middleware
    assert unauthenticated.startswith(b"HTTP/1.1 401"), unauthenticated
