"""Gateway under overload, big images, slow URL origins, a Triton restart and a steady
soak: the figures of issue 14, measured against the real server (`python -m service`
in a subprocess, localhost only), appended to runs/bench/soak.jsonl (bench/results/ with --record).

Scenarios (`--scenarios`, default all):
- overload (also `make overload`): the load generator is this process, the gateway
  another (`python -m service`, its door in the protocol layer). Best good throughput
  (200/s) = the best of closed loops at concurrency 8 and 16 (within the admission
  limit, so no 503s). "4x the sustainable load" = an open loop offering 4x that rate
  (arrivals at a fixed rate whatever the answers: the standard definition): good
  throughput vs the best closed loop run alongside (the two alternate in 4 rounds of
  --seconds / 4 each, so that the drifting speed of a shared machine touches both),
  p50/p99 of the 200s and of the 503s. Then closed loops of 64
  clients that retry at once after a 503 (as wrk does: infinite offered load) and 64 that
  honour Retry-After. Each phase also gives the gateway's event-loop lag (its
  /metrics probe, p99 from the histogram buckets) and the load generator's own, and the
  1-minute load average after it (the machine may be shared: `uptime`'s figure).
- big-images: six concurrent requests of 16 solid 3000x3000 PNGs (small files, 9 Mpx
  decoded each): server RSS before/peak/after, how long they took, their codes, and
  /health/ready latency meanwhile.
- slow-url: eight requests naming an origin that sends 12 bytes every 1.5 s (URL timeout
  2 s): how long they were held, /health/ready and a base64 request meanwhile.
- triton-restart: gateway on the Triton backend; tritonserver SIGKILLed, restarted on the
  same ports: Retry-After on the outage's 503s, seconds from Triton ready to the first 200,
  python-backend stubs and /dev/shm regions left by the killed server.
- soak: concurrency 8 for --soak-seconds: RSS before/after, codes, p50/p99.

`--code DIR` serves the `service` package found in DIR instead of this tree's (the figures
before a change: `git archive <commit> service | tar -x -C DIR`); settings it does not
know are ignored by it. Run by `make soak`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

from bench.output import add_record_flag, append_records

ROOT = Path(__file__).resolve().parents[1]

PROMPT = "circle. square. triangle. star. hexagon. ellipse."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jpeg_body(seed: int = 0) -> bytes:
    from training.shapes_world import render, sample_scene

    rng = np.random.default_rng(seed)
    scene = sample_scene(rng)
    buf = io.BytesIO()
    Image.fromarray(render(scene, rng)).save(buf, "JPEG", quality=90)
    return json.dumps({"images": [{"image": base64.b64encode(buf.getvalue()).decode(), "prompt": PROMPT}]}).encode()


def _post(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode()


async def _exchange(reader, writer, raw: bytes) -> tuple[int, bool, dict]:
    writer.write(raw)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers.get("connection", "").lower() == "close", headers


async def _closed_loop(port: int, raw: bytes, concurrency: int, seconds: float,
                       honour_retry_after: bool = False) -> list[tuple[int, float]]:
    """concurrency clients sending raw back to back for `seconds`: (status, latency) each
    (status 0: the connection failed). After a 503 a client retries at once, or, with
    honour_retry_after, after the Retry-After seconds the gateway asked for."""
    out: list[tuple[int, float]] = []
    end = time.perf_counter() + seconds

    async def worker():
        reader = writer = None
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                status, close, headers = await _exchange(reader, writer, raw)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                status, close, headers = 0, True, {}
            out.append((status, time.perf_counter() - t0))
            if close and writer is not None:
                writer.close()
                reader = writer = None
            if honour_retry_after and status == 503:
                await asyncio.sleep(min(float(headers.get("retry-after", "0")), max(end - time.perf_counter(), 0)))
        if writer is not None:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


async def _open_loop(port: int, raw: bytes, rate: float, seconds: float) -> list[tuple[int, float]]:
    """Requests arriving at `rate` per second for `seconds` whatever the answers (an open
    loop: the offered load does not fall when the server slows down), each on an idle
    keep-alive connection or a new one: (status, latency) each."""
    out: list[tuple[int, float]] = []
    idle: list = []

    async def one():
        conn = idle.pop() if idle else None
        t0 = time.perf_counter()
        try:
            if conn is not None:
                try:
                    status, close, _ = await _exchange(*conn, raw)
                except (OSError, asyncio.IncompleteReadError):
                    # an idle connection the server closed (keep-alive timeout): retry on
                    # a new one, as HTTP clients do
                    conn[1].close()
                    conn = None
            if conn is None:
                conn = await asyncio.open_connection("127.0.0.1", port)
                status, close, _ = await _exchange(*conn, raw)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            status, close = 0, True
        out.append((status, time.perf_counter() - t0))
        if conn is not None:
            if close:
                conn[1].close()
            else:
                idle.append(conn)

    tasks, start = [], time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    for _, writer in idle:
        writer.close()
    return out


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def _summary(results: list[tuple[int, float]], seconds: float) -> dict:
    codes: dict[str, int] = {}
    for status, _ in results:
        codes[str(status)] = codes.get(str(status), 0) + 1
    ok = [t for s, t in results if s == 200]
    shed = [t for s, t in results if s == 503]
    return {"requests": len(results), "codes": codes, "good_per_s": round(len(ok) / seconds, 1),
            "ok_p50_ms": _pct(ok, 50), "ok_p99_ms": _pct(ok, 99), "503_p50_ms": _pct(shed, 50),
            "503_p99_ms": _pct(shed, 99)}


class Gateway:
    """`python -m service` in a subprocess on a free port, GLIPV2_* from env."""

    def __init__(self, env: dict[str, str], code: Path | None) -> None:
        self.port = _free_port()
        full = {**os.environ, "GLIPV2_PORT": str(self.port), "GLIPV2_REPOSITORY": str(ROOT / "model_repository"),
                "GLIPV2_THREADS": "2", "GLIPV2_LOG_LEVEL": "warning", **env}
        if code is not None:
            full["PYTHONPATH"] = str(code)
        self.proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=code or ROOT, env=full,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.ready_status() == 200:
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("gateway not ready in 120 s")

    def ready_status(self, timeout: float = 10.0) -> int:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health/ready", timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
        return 0.0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _timed_ready(gw: Gateway) -> tuple[int, float]:
    t0 = time.perf_counter()
    status = gw.ready_status(timeout=30)
    return status, round(time.perf_counter() - t0, 3)


# ------------------------------------------------------------------------ scenarios

def _lag_buckets(port: int) -> dict[float, float] | None:
    """The gateway's event-loop lag histogram (cumulative counts by upper bound, seconds);
    None for a gateway without the probe (--code of an older tree)."""
    import re
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    found = re.findall(r'^glipv2_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M)
    return {float(le): float(n) for le, n in found} or None


def _bucket_diff(before: dict | None, after: dict | None) -> dict | None:
    """The loop-lag histogram's counts added between two scrapes (None if either failed)."""
    if not before or not after:
        return None
    return {b: after[b] - before.get(b, 0.0) for b in after}


def _lag_p99_ms(diff: dict | None) -> dict | None:
    """p99 of the lag samples in a histogram of counts (the bucket bound it falls in, ms)
    and how many of them were over 50 ms."""
    if not diff:
        return None
    total = diff[float("inf")]
    if not total:
        return None
    p99 = next(b for b in sorted(diff) if diff[b] >= 0.99 * total)
    return {"p99_ms_le": None if p99 == float("inf") else round(p99 * 1000, 1), "samples": int(total),
            "over_50ms": int(total - diff.get(0.05, 0.0))}


def _phase(port: int, load) -> dict:
    """Runs the coroutine function `load` (-> (status, latency) list, seconds it offered
    load) with a loop-lag probe in this process too: summary + both lags + load average."""
    from service.looplag import LAG_BUCKETS_S, LoopLagProbe

    before = _lag_buckets(port)

    async def run():
        probe = LoopLagProbe()
        probe.start()
        try:
            return await load(), probe
        finally:
            await probe.stop()

    (results, seconds), probe = asyncio.run(run())
    gen = dict(zip(LAG_BUCKETS_S, map(float, probe.counts))) | {float("inf"): float(probe.n)}
    return {**_summary(results, seconds), "gateway_loop_lag": _lag_p99_ms(_bucket_diff(before, _lag_buckets(port))),
            "generator_loop_lag": _lag_p99_ms(gen), "load_1m": round(os.getloadavg()[0], 2)}


ROUNDS = 4


def _rounds(port: int, loads: dict, rounds: int) -> dict[str, dict]:
    """Runs each load (a coroutine function -> (results, seconds)) in turn, `rounds` times;
    the summary of each over all its rounds, with the gateway's loop lag over them."""
    results: dict[str, list] = {name: [] for name in loads}
    seconds = dict.fromkeys(loads, 0.0)
    lags: dict[str, dict] = {}  # per load: the lag histogram's counts added during its rounds
    for _ in range(rounds):
        for name, load in loads.items():
            before = _lag_buckets(port)
            res, secs = asyncio.run(load())
            added = _bucket_diff(before, _lag_buckets(port))
            results[name] += res
            seconds[name] += secs
            if added:
                total = lags.setdefault(name, dict.fromkeys(added, 0.0))
                for b, n in added.items():
                    total[b] = total.get(b, 0.0) + n
    out = {}
    for name in loads:
        out[name] = {**_summary(results[name], seconds[name]),
                     "gateway_loop_lag": _lag_p99_ms(lags.get(name)),
                     "load_1m": round(os.getloadavg()[0], 2)}
    return out


def overload(args, code) -> dict:
    """Best good throughput (closed loops within the admission limit), then the issue's
    '4x the sustainable load' as an open loop, then closed loops of 64 clients retrying
    at once vs honouring Retry-After."""
    gw = Gateway({}, code)
    s = args.seconds
    try:
        raw = _post("/v1/detect", _jpeg_body())
        asyncio.run(_closed_loop(gw.port, raw, 4, 2.0))  # warm-up
        out: dict = {"load_1m_before": round(os.getloadavg()[0], 2)}

        def closed(c: int, honour: bool = False):
            async def load():
                return await _closed_loop(gw.port, raw, c, s, honour_retry_after=honour), s
            return load

        for c in (8, 16):
            out[f"c{c}"] = _phase(gw.port, closed(c))
            print(f"  overload c={c}: {out[f'c{c}']}", flush=True)
        best_c = 8 if out["c8"]["good_per_s"] >= out["c16"]["good_per_s"] else 16
        best = out[f"c{best_c}"]["good_per_s"]
        out["best_good_per_s"] = best
        rate = 4 * best
        part = s / ROUNDS

        # Good answers over the time until the last answer, for both: requests admitted near
        # the end are still served (good work) after the arrivals stop.
        async def open_4x():
            t0 = time.perf_counter()
            return await _open_loop(gw.port, raw, rate, part), time.perf_counter() - t0

        async def sustainable():
            t0 = time.perf_counter()
            return await _closed_loop(gw.port, raw, best_c, part), time.perf_counter() - t0

        # The ratio is taken side by side: the open loop and the best closed loop alternate
        # in ROUNDS short parts (the speed of a shared 2-core machine drifts by a third
        # between minutes, which a ratio of two phases run one after the other inherited).
        both = _rounds(gw.port, {"open_4x": open_4x, "best": sustainable}, ROUNDS)
        out["open_4x"] = {"offered_per_s": round(rate, 1), **both["open_4x"]}
        out["best_alongside"] = {"concurrency": best_c, **both["best"]}
        alongside = both["best"]["good_per_s"]
        out["good_at_4x_vs_best"] = round(out["open_4x"]["good_per_s"] / alongside, 3) if alongside else None
        print(f"  overload open loop at {rate:.1f}/s: {out['open_4x']}", flush=True)
        print(f"  overload closed loop at {best_c}, alongside: {out['best_alongside']}", flush=True)
        for name, honour in (("retry_at_once_c64", False), ("retry_after_c64", True)):
            out[name] = _phase(gw.port, closed(64, honour))
            out[f"good_{name}_vs_best"] = round(out[name]["good_per_s"] / best, 3) if best else None
            print(f"  overload {name}: {out[name]}", flush=True)
        return out
    finally:
        gw.stop()


def big_images(args, code) -> dict:
    gw = Gateway({"GLIPV2_MAX_BODY_BYTES": str(20 * 1024 * 1024)}, code)
    try:
        buf = io.BytesIO()
        Image.new("RGB", (3000, 3000), (10, 200, 30)).save(buf, "PNG")
        item = {"image": base64.b64encode(buf.getvalue()).decode(), "prompt": "circle."}
        raw = _post("/v1/detect", json.dumps({"images": [item] * 16}).encode())
        before = gw.rss_mb()
        peak = [before]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak.append(gw.rss_mb())
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        async def run():
            async def one():
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                t0 = time.perf_counter()
                try:
                    status, _, _ = await _exchange(reader, writer, raw)
                except (OSError, asyncio.IncompleteReadError):
                    status = 0
                writer.close()
                return status, time.perf_counter() - t0

            tasks = [asyncio.create_task(one()) for _ in range(6)]
            await asyncio.sleep(1.0)
            ready = await asyncio.to_thread(_timed_ready, gw)
            return await asyncio.gather(*tasks), ready

        results, ready = asyncio.run(run())
        stop.set()
        sampler.join()
        time.sleep(2.0)
        return {"codes": sorted(s for s, _ in results), "max_s": round(max(t for _, t in results), 2),
                "rss_before_mb": before, "rss_peak_mb": max(peak), "rss_after_mb": gw.rss_mb(),
                "ready_status": ready[0], "ready_s": ready[1]}
    finally:
        gw.stop()


class _Trickle(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *a):
        pass

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            for _ in range(40):
                self.wfile.write(b"\x89PNG\r\n\x1a\n0000")
                self.wfile.flush()
                time.sleep(1.5)
        except OSError:
            pass


def slow_url(args, code) -> dict:
    origin = ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    origin.daemon_threads = True
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    oport = origin.server_address[1]
    gw = Gateway({"GLIPV2_URL_ALLOWLIST": f"127.0.0.1:{oport},127.0.0.1", "GLIPV2_URL_ALLOW_PRIVATE": "1",
                  "GLIPV2_URL_TIMEOUT_S": "2"}, code)
    try:
        raw = _post("/v1/detect", json.dumps({"images": [{"url": f"http://127.0.0.1:{oport}/x.png",
                                                          "prompt": "star."}]}).encode())
        normal = _post("/v1/detect", _jpeg_body())

        async def run():
            async def one(payload):
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                t0 = time.perf_counter()
                try:
                    status, _, _ = await _exchange(reader, writer, payload)
                except (OSError, asyncio.IncompleteReadError):
                    status = 0
                writer.close()
                return status, round(time.perf_counter() - t0, 2)

            slow = [asyncio.create_task(one(raw)) for _ in range(8)]
            await asyncio.sleep(1.0)
            ready = await asyncio.to_thread(_timed_ready, gw)
            fast = await one(normal)
            return await asyncio.gather(*slow), ready, fast

        slow, ready, fast = asyncio.run(run())
        return {"slow_codes": sorted(s for s, _ in slow), "slow_max_s": max(t for _, t in slow),
                "ready_status": ready[0], "ready_s": ready[1], "normal_status": fast[0], "normal_s": fast[1]}
    finally:
        gw.stop()
        origin.shutdown()


def triton_restart(args, code) -> dict:
    import urllib.request

    from export.local_triton import TritonServer, install

    root = install()
    srv = TritonServer(ROOT / "model_repository", root=root)
    srv.start()
    srv.wait_ready(timeout=240)
    servers = [srv]
    gw = Gateway({"GLIPV2_BACKEND": "triton", "GLIPV2_TRITON_URL": srv.url_grpc}, code)
    body = _jpeg_body()

    def detect() -> tuple[int, str | None]:
        req = urllib.request.Request(f"http://127.0.0.1:{gw.port}/v1/detect", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.headers.get("Retry-After")
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Retry-After")
        except OSError:
            return 0, None

    try:
        assert detect()[0] == 200
        srv.kill()
        outage = detect()
        time.sleep(args.outage)
        srv.stop()
        left = srv.leftovers() if hasattr(srv, "leftovers") else (None, None)
        new = TritonServer(ROOT / "model_repository", srv.http_port, srv.grpc_port, srv.metrics_port, root=root)
        servers.append(new)
        new.start()
        while not new.is_ready():
            time.sleep(0.02)
        t_ready = time.monotonic()
        while detect()[0] != 200 and time.monotonic() - t_ready < 180:
            time.sleep(0.05)
        return {"outage_status": outage[0], "outage_retry_after": outage[1],
                "outage_s": args.outage, "recovery_s": round(time.monotonic() - t_ready, 2),
                "leftover_pids": None if left[0] is None else len(left[0]),
                "leftover_shm": None if left[1] is None else len(left[1])}
    finally:
        gw.stop()
        for s in servers:
            s.cleanup()


def soak(args, code) -> dict:
    gw = Gateway({}, code)
    try:
        raw = _post("/v1/detect", _jpeg_body(1))
        asyncio.run(_closed_loop(gw.port, raw, 4, 2.0))
        before = gw.rss_mb()
        results = asyncio.run(_closed_loop(gw.port, raw, 8, args.soak_seconds))
        return {**_summary(results, args.soak_seconds), "seconds": args.soak_seconds, "rss_before_mb": before,
                "rss_after_mb": gw.rss_mb()}
    finally:
        gw.stop()


SCENARIOS = {"overload": overload, "big-images": big_images, "slow-url": slow_url, "triton-restart": triton_restart,
             "soak": soak}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--seconds", type=float, default=8.0, help="per overload level")
    p.add_argument("--soak-seconds", type=float, default=60.0)
    p.add_argument("--outage", type=float, default=10.0, help="seconds tritonserver stays down")
    p.add_argument("--code", type=Path, default=None, help="serve the service package from this folder")
    p.add_argument("--label", default="this tree")
    p.add_argument("--no-save", action="store_true")
    add_record_flag(p)
    args = p.parse_args(argv)
    record = {"bench": "soak", "label": args.label, "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "host": f"{platform.machine()}, {os.cpu_count()} cpus",
              # the machine may be shared: `uptime`'s load averages (1, 5, 15 min) at the start
              "loadavg": [round(x, 2) for x in os.getloadavg()], "results": {}}
    for name in args.scenarios.split(","):
        print(f"{name} ({args.label})...", flush=True)
        t0 = time.perf_counter()
        record["results"][name] = SCENARIOS[name](args, args.code)
        print(f"  {name}: {record['results'][name]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if not args.no_save:
        append_records("soak.jsonl", [record], args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
