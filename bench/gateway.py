"""What the gateway costs on top of the model, on photo-sized JPEGs, side by side in one run.

`python -m bench.gateway` (part of `make bench`):
1. decoding: the full decode + letterbox (service.images.decode_image, what the gateway
   did before draft mode) against service.images.decode_letterboxed (JPEG draft mode), on
   640x480, 1920x1080 and 4032x3024 JPEGs;
2. the direct engine call at batch 1 (BatchRunner.run_batch on a letterboxed image with
   a cached prompt: detector + postprocess, in this process);
3. the real gateway (`python -m service`, embedded backend, in its own process) driven by
   a load generator in this process (so it does not share the server's GIL), over HTTP
   keep-alive connections: p50 end to end at concurrency 1 for each JPEG, JSON/base64 and
   multipart; the overhead ratio (gateway p50 - engine p50) / engine p50;
4. throughput at concurrency 1, 4, 16, 64 (640x480, JSON) and the batch sizes the
   micro-batcher formed (from /v1/stats);
5. a cached prompt against a new prompt on every request (the text encoder runs).
The table is printed and appended to runs/bench/gateway.jsonl (the committed
bench/results/ with --record; see bench/output.py).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bench.output import add_record_flag, results_file

SIZES = ((640, 480), (1920, 1080), (4032, 3024))
PROMPT = "red circle. blue square. green triangle. star."
WORDS = ("red", "green", "blue", "yellow", "purple", "orange", "small", "large", "circle", "square", "triangle",
         "star", "hexagon", "cross", "left", "right")


def photo_jpeg(w: int, h: int, seed: int = 0, quality: int = 90) -> bytes:
    """A photo-like JPEG (gradients, discs, sensor-like noise): 4032x3024 is ~3 MB, like a
    phone photo, where a flat synthetic image would compress to almost nothing."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = Image.fromarray(np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], -1).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(40):
        x0, y0, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(w // 40, w // 6))
        d.ellipse([x0, y0, x0 + r, y0 + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    noisy = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def p50_ms(fn, n: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


# ------------------------------------------------------------------------------ client


class Client:
    """One keep-alive HTTP/1.1 connection (http.client: no extra dependency, little CPU)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        for attempt in (0, 1):  # the server closes idle keep-alive connections (uvicorn: 5 s)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                r = self.conn.getresponse()
                return r.status, r.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                if attempt:
                    raise

    def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        return self._request("POST", path, body, {"Content-Type": content_type})

    def get(self, path: str) -> dict:
        return json.loads(self._request("GET", path)[1])


def json_body(jpeg: bytes, prompt: str = PROMPT) -> bytes:
    return json.dumps({"images": [{"image": base64.b64encode(jpeg).decode(), "prompt": prompt}]}).encode()


def multipart_body(jpeg: bytes, prompt: str = PROMPT) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n{prompt}\r\n".encode(),
             f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n"
             "Content-Type: image/jpeg\r\n\r\n".encode() + jpeg + b"\r\n", f"--{boundary}--\r\n".encode()]
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def load(port: int, concurrency: int, seconds: float, body: bytes) -> tuple[float, list[float], int]:
    """`concurrency` connections, each sending the next request when its last one is
    answered, for `seconds`. Returns (requests/s, latencies s, errors)."""
    stop = time.perf_counter() + seconds
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def worker() -> None:
        c = Client(port)
        while time.perf_counter() < stop:
            t = time.perf_counter()
            status, _ = c.post("/v1/detect", body, "application/json")
            dt = time.perf_counter() - t
            with lock:
                if status == 200:
                    latencies.append(dt)
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies) / (time.perf_counter() - t0), latencies, errors[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway(repository: Path, threads: int, port: int, extra_env: dict[str, str],
                  command: list[str] | None = None) -> subprocess.Popen:
    """`python -m service` (or `command`) with the bench's GLIPV2_* settings, once ready."""
    env = {**os.environ, "GLIPV2_REPOSITORY": str(repository), "GLIPV2_PORT": str(port), "GLIPV2_HOST": "127.0.0.1",
           "GLIPV2_THREADS": str(threads), "GLIPV2_QUEUE_SIZE": "256", "GLIPV2_LOG_LEVEL": "warning",
           "GLIPV2_MAX_BODY_BYTES": str(64 << 20), "GLIPV2_MAX_CONCURRENT_REQUESTS": "256",
           "GLIPV2_MAX_BODY_MB_IN_FLIGHT": "2048", **extra_env}
    proc = subprocess.Popen(command or [sys.executable, "-m", "service"], env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health/ready")
            if c.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the gateway did not become ready in 120 s")


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (engine and gateway alike)")
    p.add_argument("--requests", type=int, default=15, help="sequential requests per latency figure")
    p.add_argument("--seconds", type=float, default=6.0, help="duration of each throughput level")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--no-save", action="store_true")
    add_record_flag(p)
    args = p.parse_args(argv)

    from glipv2.image import letterbox
    from glipv2.runtime.batch import BatchItem
    from service.backends.embedded import EmbeddedBackend
    from service.images import decode_image, decode_letterboxed

    jpegs = {f"{w}x{h}": photo_jpeg(w, h) for w, h in SIZES}
    backend = EmbeddedBackend(args.repository, threads=args.threads)
    hw = backend.image_hw
    row: dict = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
                 "cpus": os.cpu_count(), "device": "cpu", "backend": "embedded", "threads": args.threads,
                 "repository": str(args.repository), "image_hw": list(hw), "jpeg_bytes": {k: len(v) for k, v in jpegs.items()}}

    # 1. decoding, full vs draft
    row["decode_full_ms"], row["decode_draft_ms"] = {}, {}
    for name, raw in jpegs.items():
        row["decode_full_ms"][name] = p50_ms(lambda: letterbox(decode_image(raw, 10**9), hw), max(3, args.requests // 3))
        row["decode_draft_ms"][name] = p50_ms(lambda: decode_letterboxed(raw, 10**9, hw), args.requests)

    # 2. the direct engine call, batch 1, cached prompt (and uncached: the text encoder too)
    pixels, lb, _ = decode_letterboxed(jpegs["640x480"], 10**9, hw)
    item = BatchItem(pixels, lb, backend.tokenize(PROMPT), backend.manifest.postprocess)
    row["engine_p50_ms"] = p50_ms(lambda: backend.run_batch([item]), args.requests * 2, warmup=3)
    prompts = iter(f"{i} " + " ".join(WORDS[j] for j in np.random.default_rng(i).choice(len(WORDS), 4)) for i in range(10**6))
    row["engine_uncached_p50_ms"] = p50_ms(lambda: backend.run_batch([BatchItem(pixels, lb, backend.tokenize(next(prompts)),
                                                                                 backend.manifest.postprocess)]),
                                           args.requests * 2)
    backend.close()

    # 3-5. the gateway in its own process
    port = free_port()
    server = start_gateway(args.repository, args.threads, port, {})
    try:
        c = Client(port)
        row["gateway_p50_ms"], row["server_decode_ms"] = {}, {}
        for name, raw in jpegs.items():
            for kind in ("json", "multipart"):
                if kind == "json":
                    body, ctype, path = json_body(raw), "application/json", "/v1/detect"
                else:
                    (body, ctype), path = multipart_body(raw), "/v1/detect/upload"
                decode = []

                def once() -> None:
                    status, out = c.post(path, body, ctype)
                    assert status == 200, out[:300]
                    decode.append(json.loads(out)["timings"]["decode_ms"])

                row["gateway_p50_ms"][f"{name} {kind}"] = p50_ms(once, args.requests, warmup=2)
                row["server_decode_ms"][f"{name} {kind}"] = statistics.median(decode[2:])
        row["overhead"] = {k: (v - row["engine_p50_ms"]) / row["engine_p50_ms"] for k, v in row["gateway_p50_ms"].items()}

        body = json_body(jpegs["640x480"])
        row["throughput_rps"], row["latency_p50_ms"], row["batch_sizes"], row["errors"] = {}, {}, {}, {}
        for conc in (int(x) for x in args.concurrency.split(",")):
            before = c.get("/v1/stats")["batcher"]["batch_sizes"]
            rps, lat, errors = load(port, conc, args.seconds, body)
            after = c.get("/v1/stats")["batcher"]["batch_sizes"]
            row["throughput_rps"][str(conc)] = rps
            row["latency_p50_ms"][str(conc)] = statistics.median(lat) * 1000 if lat else None
            row["batch_sizes"][str(conc)] = {k: after.get(k, 0) - before.get(k, 0) for k in after
                                             if after.get(k, 0) - before.get(k, 0)}
            row["errors"][str(conc)] = errors
        base = row["throughput_rps"].get("1")
        row["throughput_ratio_vs_1"] = {k: v / base for k, v in row["throughput_rps"].items()} if base else {}

        row["prompt_cached_p50_ms"] = p50_ms(lambda: c.post("/v1/detect", body, "application/json"), args.requests * 2)
        row["prompt_uncached_p50_ms"] = p50_ms(
            lambda: c.post("/v1/detect", json_body(jpegs["640x480"], next(prompts)), "application/json"),
            args.requests * 2)
    finally:
        server.terminate()
        server.wait(timeout=60)

    print_table(row)
    if not args.no_save:
        results = results_file("gateway.jsonl", args.record)
        results.parent.mkdir(parents=True, exist_ok=True)
        print(f"appended to {results}")
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


def print_table(row: dict) -> None:
    e = row["engine_p50_ms"]
    print(f"gateway vs direct engine call (batch 1, {row['threads']} ORT threads, model input "
          f"{row['image_hw'][0]}x{row['image_hw'][1]}; engine p50 {e:.1f} ms cached prompt, "
          f"{row['engine_uncached_p50_ms']:.1f} ms uncached)")
    print(f"{'image':<22}{'bytes':>9}{'decode full':>13}{'decode draft':>14}{'speedup':>9}"
          f"{'gateway p50':>13}{'server decode':>15}{'overhead':>10}")
    for name in row["decode_full_ms"]:
        full, draft = row["decode_full_ms"][name], row["decode_draft_ms"][name]
        for kind in ("json", "multipart"):
            key = f"{name} {kind}"
            print(f"{key:<22}{row['jpeg_bytes'][name]:>9}{full:>11.1f}ms{draft:>12.1f}ms{full / draft:>8.1f}x"
                  f"{row['gateway_p50_ms'][key]:>11.1f}ms{row['server_decode_ms'][key]:>13.1f}ms"
                  f"{row['overhead'][key]:>9.0%}")
    print("throughput, 640x480 JSON (load generator in its own process):")
    for conc, rps in row["throughput_rps"].items():
        sizes = ", ".join(f"{k}:{v}" for k, v in row["batch_sizes"][conc].items())
        print(f"  concurrency {conc:>3}: {rps:6.1f} req/s ({row['throughput_ratio_vs_1'].get(conc, 0):.2f}x of 1), "
              f"p50 {row['latency_p50_ms'][conc] or 0:.1f} ms, errors {row['errors'][conc]}, batch sizes {{{sizes}}}")
    print(f"prompt cached p50 {row['prompt_cached_p50_ms']:.1f} ms, a new prompt each request "
          f"{row['prompt_uncached_p50_ms']:.1f} ms")


if __name__ == "__main__":
    sys.exit(main())
