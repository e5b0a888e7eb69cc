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
The table is printed with the issue's targets (overhead <= 10% at 640x480 and <= 50% at
4032x3024, JSON/base64; draft decoding of the 12 MP JPEG >= 5x faster than a full decode;
concurrency 16 >= 2x concurrency 1) and the load average (the CPU may be shared), and
appended to runs/bench/gateway.jsonl (the committed bench/results/ with --record; see
bench/output.py).
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

from bench.output import add_record_flag, append_records

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


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


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
    p.add_argument("--seconds", type=float, default=6.0, help="duration of each throughput level (over all rounds)")
    p.add_argument("--rounds", type=int, default=3, help="throughput rounds (the levels alternate)")
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

    # 2-3. the direct engine call (batch 1, cached prompt: detector + postprocess, in this
    # process) and the gateway (its own process) interleaved request by request, so both
    # see the same machine load; wall p50 of each and CPU time per call (this process's
    # for the engine, the server's from /proc for the gateway), which shifts far less with
    # the load of a shared CPU than wall time does.
    pixels, lb, _ = decode_letterboxed(jpegs["640x480"], 10**9, hw)
    item = BatchItem(pixels, lb, backend.tokenize(PROMPT), backend.manifest.postprocess)
    prompts = iter(f"{i} " + " ".join(WORDS[j] for j in np.random.default_rng(i).choice(len(WORDS), 4)) for i in range(10**6))
    row["engine_uncached_p50_ms"] = p50_ms(lambda: backend.run_batch([BatchItem(pixels, lb, backend.tokenize(next(prompts)),
                                                                                 backend.manifest.postprocess)]),
                                           args.requests)
    port = free_port()
    server = start_gateway(args.repository, args.threads, port, {})
    try:
        c = Client(port)
        for _ in range(3):
            backend.run_batch([item])
        row["gateway_p50_ms"], row["engine_p50_ms_with"], row["server_decode_ms"] = {}, {}, {}
        row["gateway_cpu_ms"], row["engine_cpu_ms_with"] = {}, {}
        engine_all = []
        for name, raw in jpegs.items():
            for kind in ("json", "multipart"):
                if kind == "json":
                    body, ctype, path = json_body(raw), "application/json", "/v1/detect"
                else:
                    (body, ctype), path = multipart_body(raw), "/v1/detect/upload"
                for _ in range(2):  # warm-up
                    c.post(path, body, ctype)
                gw, eng, decode, gw_cpu, eng_cpu = [], [], [], [], []
                for _ in range(args.requests):
                    t, cpu = time.perf_counter(), time.process_time()
                    backend.run_batch([item])
                    eng.append(time.perf_counter() - t)
                    eng_cpu.append(time.process_time() - cpu)
                    t, cpu = time.perf_counter(), cpu_seconds(server.pid)
                    status, out = c.post(path, body, ctype)
                    gw.append(time.perf_counter() - t)
                    gw_cpu.append(cpu_seconds(server.pid) - cpu)
                    assert status == 200, out[:300]
                    decode.append(json.loads(out)["timings"]["decode_ms"])
                key = f"{name} {kind}"
                row["gateway_p50_ms"][key] = statistics.median(gw) * 1000
                row["engine_p50_ms_with"][key] = statistics.median(eng) * 1000
                row["server_decode_ms"][key] = statistics.median(decode)
                row["gateway_cpu_ms"][key] = sum(gw_cpu) / len(gw_cpu) * 1000
                row["engine_cpu_ms_with"][key] = sum(eng_cpu) / len(eng_cpu) * 1000
                engine_all += eng
        row["engine_p50_ms"] = statistics.median(engine_all) * 1000
        row["overhead"] = {k: (v - row["engine_p50_ms_with"][k]) / row["engine_p50_ms_with"][k]
                           for k, v in row["gateway_p50_ms"].items()}
        row["overhead_cpu"] = {k: (v - row["engine_cpu_ms_with"][k]) / row["engine_cpu_ms_with"][k]
                               for k, v in row["gateway_cpu_ms"].items()}
        backend.close()

        # 4. throughput: the concurrency levels alternate in short rounds (same load for all)
        body = json_body(jpegs["640x480"])
        levels = [int(x) for x in args.concurrency.split(",")]
        done = {conc: [0, 0.0, [], 0] for conc in levels}  # requests, seconds, latencies, errors
        row["batch_sizes"] = {str(conc): {} for conc in levels}
        for _ in range(args.rounds):
            for conc in levels:
                before = c.get("/v1/stats")["batcher"]["batch_sizes"]
                t = time.perf_counter()
                rps, lat, errors = load(port, conc, args.seconds / args.rounds, body)
                d = done[conc]
                d[0], d[1], d[3] = d[0] + len(lat), d[1] + time.perf_counter() - t, d[3] + errors
                d[2] += lat
                after = c.get("/v1/stats")["batcher"]["batch_sizes"]
                sizes = row["batch_sizes"][str(conc)]
                for k in after:
                    if after.get(k, 0) - before.get(k, 0):
                        sizes[k] = sizes.get(k, 0) + after[k] - before.get(k, 0)
        row["throughput_rps"] = {str(k): v[0] / v[1] for k, v in done.items()}
        row["latency_p50_ms"] = {str(k): statistics.median(v[2]) * 1000 if v[2] else None for k, v in done.items()}
        row["errors"] = {str(k): v[3] for k, v in done.items()}
        base = row["throughput_rps"].get("1")
        row["throughput_ratio_vs_1"] = {k: v / base for k, v in row["throughput_rps"].items()} if base else {}

        # 5. a cached prompt against a new prompt on every request, interleaved
        cached, uncached = [], []
        for _ in range(args.requests):
            t = time.perf_counter()
            c.post("/v1/detect", body, "application/json")
            cached.append(time.perf_counter() - t)
            new = json_body(jpegs["640x480"], next(prompts))
            t = time.perf_counter()
            c.post("/v1/detect", new, "application/json")
            uncached.append(time.perf_counter() - t)
        row["prompt_cached_p50_ms"] = statistics.median(cached) * 1000
        row["prompt_uncached_p50_ms"] = statistics.median(uncached) * 1000
    finally:
        server.terminate()
        server.wait(timeout=60)

    row["load_average_1m"] = round(os.getloadavg()[0], 2)
    row["targets"] = targets(row)
    print_table(row)
    if not args.no_save:
        append_records("gateway.jsonl", [row], args.record)
    return 0


def targets(row: dict) -> dict[str, dict]:
    """The issue's targets: {name: {value, limit, met}} (ratios measured in this run)."""
    out = {}

    def target(name: str, value: float | None, limit: float, at_most: bool) -> None:
        met = value is not None and (value <= limit if at_most else value >= limit)
        out[name] = {"value": value, "limit": limit, "at_most": at_most, "met": met}

    target("overhead 640x480 json", row["overhead"].get("640x480 json"), 0.10, True)
    target("overhead 4032x3024 json", row["overhead"].get("4032x3024 json"), 0.50, True)
    full, draft = row["decode_full_ms"].get("4032x3024"), row["decode_draft_ms"].get("4032x3024")
    target("decode speedup 4032x3024", full / draft if full and draft else None, 5.0, False)
    target("throughput concurrency 16 / 1", row["throughput_ratio_vs_1"].get("16"), 2.0, False)
    return out


def print_table(row: dict) -> None:
    e = row["engine_p50_ms"]
    print(f"gateway vs direct engine call, interleaved request by request (batch 1, {row['threads']} ORT "
          f"threads, model input {row['image_hw'][0]}x{row['image_hw'][1]}; engine p50 {e:.1f} ms cached prompt, "
          f"{row['engine_uncached_p50_ms']:.1f} ms uncached; cpu: CPU time per call, engine in this process, "
          f"gateway in the server's)")
    print(f"{'image':<22}{'bytes':>9}{'decode full':>13}{'decode draft':>14}{'speedup':>9}"
          f"{'engine p50':>12}{'gateway p50':>13}{'server decode':>15}{'overhead':>10}"
          f"{'engine cpu':>12}{'gateway cpu':>13}{'cpu overhead':>14}")
    for name in row["decode_full_ms"]:
        full, draft = row["decode_full_ms"][name], row["decode_draft_ms"][name]
        for kind in ("json", "multipart"):
            key = f"{name} {kind}"
            print(f"{key:<22}{row['jpeg_bytes'][name]:>9}{full:>11.1f}ms{draft:>12.1f}ms{full / draft:>8.1f}x"
                  f"{row['engine_p50_ms_with'][key]:>10.1f}ms{row['gateway_p50_ms'][key]:>11.1f}ms"
                  f"{row['server_decode_ms'][key]:>13.1f}ms{row['overhead'][key]:>9.0%}"
                  f"{row['engine_cpu_ms_with'][key]:>10.1f}ms{row['gateway_cpu_ms'][key]:>11.1f}ms"
                  f"{row['overhead_cpu'][key]:>13.0%}")
    print("throughput, 640x480 JSON (load generator in its own process):")
    for conc, rps in row["throughput_rps"].items():
        sizes = ", ".join(f"{k}:{v}" for k, v in row["batch_sizes"][conc].items())
        print(f"  concurrency {conc:>3}: {rps:6.1f} req/s ({row['throughput_ratio_vs_1'].get(conc, 0):.2f}x of 1), "
              f"p50 {row['latency_p50_ms'][conc] or 0:.1f} ms, errors {row['errors'][conc]}, batch sizes {{{sizes}}}")
    print(f"prompt cached p50 {row['prompt_cached_p50_ms']:.1f} ms, a new prompt each request "
          f"{row['prompt_uncached_p50_ms']:.1f} ms")
    print(f"targets (load average {row.get('load_average_1m', float('nan')):.2f} over the last minute, "
          f"{row['cpus']} CPUs):")
    for name, t in row.get("targets", {}).items():
        value = "n/a" if t["value"] is None else (f"{t['value']:.0%}" if name.startswith("overhead")
                                                  else f"{t['value']:.2f}x")
        limit = f"{t['limit']:.0%}" if name.startswith("overhead") else f"{t['limit']:.1f}x"
        print(f"  {name:<32} {value:>8}  ({'<=' if t['at_most'] else '>='} {limit}): "
              f"{'met' if t['met'] else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
