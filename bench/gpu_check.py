"""What a GPU host runs first: `make gpu-check` (= python -m bench.gpu_check), under 10 minutes.

1. driver and CUDA: nvidia-smi, the driver API's device count and the GPU's name;
2. ONNX Runtime's CUDA provider really used: the embedded backend with GLIPV2_DEVICE=cuda
   (it refuses to start when ONNX Runtime falls back to the CPU);
3. the embedded backend's detection latency at batch 1 and 8, GPU and CPU side by side
   (same images, same prompts, alternating rounds; medians and the ratio);
4. the python-backend Triton (cpu flavour, the local tritonserver) under concurrency:
   16 concurrent detection batches through the Triton backend; its models run ONNX Runtime
   on the CPU (export/triton_python/model.py asks for the CPU provider), so this measures
   the server, not the GPU;
5. where Docker and the NVIDIA Container Toolkit exist: `docker compose up` of the GPU
   profile (exporter -> engine builder, which checks TensorRT parity of detections, answers
   and captions -> Triton -> gateway), one request per task through the gateway, then down.

Figures go to bench/results/gpu_check-<GPU name>.json. Exit status: 0 all checks passed,
1 a check failed, 3 no CUDA GPU here (`--cpu-dry-run` then runs steps 3-4 on the CPU only,
to check the script itself; it writes to --out, not bench/results/).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PROMPT = "circle. square. triangle. star. hexagon. cross."
EXIT_OK, EXIT_FAILED, EXIT_NO_GPU = 0, 1, 3


def _items(backend, n: int, seed: int = 0) -> list:
    """n letterboxed shapes-world images with one prompt, as the gateway's batcher builds them."""
    from glipv2.image import letterbox
    from glipv2.postprocess import PostprocessConfig
    from glipv2.runtime.batch import BatchItem
    from training import shapes_world as sw

    prompt = backend.tokenize(PROMPT)
    items = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        pixels, box = letterbox(sw.render(sw.sample_scene(rng), rng), backend.image_hw)
        items.append(BatchItem(pixels, box, prompt, PostprocessConfig()))
    return items


def latency_ms(backend, batch: int, rounds: int = 20) -> float:
    items = _items(backend, batch)
    backend.run_batch(items)  # warm-up (CUDA kernels, TensorRT-free here)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        backend.run_batch(items)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def embedded_latency(repository: Path, devices: list[str], rounds: int) -> dict:
    from service.backends.embedded import EmbeddedBackend

    out = {}
    backends = {d: EmbeddedBackend(repository, device=d) for d in devices}
    for d, b in backends.items():
        out[d] = {"providers": b.providers, "device": b.device}
    for batch in (1, 8):
        for d, b in backends.items():  # side by side, the same images
            out[d][f"batch{batch}_ms"] = round(latency_ms(b, batch, rounds), 2)
    if "cuda" in backends:
        for batch in (1, 8):
            out[f"cpu_over_cuda_batch{batch}"] = round(out["cpu"][f"batch{batch}_ms"] / out["cuda"][f"batch{batch}_ms"], 2)
    return out


def triton_concurrency(repository: Path, requests: int = 16, batch: int = 4) -> dict:
    from export.local_triton import TritonServer, install
    from service.backends.triton import TritonBackend

    with TritonServer(repository, root=install()) as server:
        backend = TritonBackend(repository, server.url_grpc)
        try:
            items = _items(backend, batch, seed=1)
            backend.run_batch(items)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(requests) as pool:
                list(pool.map(lambda _: backend.run_batch(items), range(requests)))
            seconds = time.perf_counter() - t0
            stats = server.model_stats("detector")
        finally:
            backend.close()
    (model,) = stats["model_stats"]
    return {"concurrent_requests": requests, "images_per_request": batch,
            "images_per_s": round(requests * batch / seconds, 1),
            "detector_executions": model["execution_count"], "detector_inferences": model["inference_count"]}


def compose_gpu_profile(timeout_s: float = 480) -> dict:
    """`docker compose up` of the default (GPU) profile, one request per task, then down."""
    if shutil.which("docker") is None:
        return {"skipped": "docker is not installed"}
    info = subprocess.run(["docker", "info", "--format", "{{json .Runtimes}}"], capture_output=True, text=True)
    if info.returncode != 0 or "nvidia" not in info.stdout:
        return {"skipped": "docker has no nvidia runtime (install the NVIDIA Container Toolkit)"}
    compose = ["docker", "compose"]
    t0 = time.monotonic()
    up = subprocess.run([*compose, "up", "-d", "--build"], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    result: dict = {"up_rc": up.returncode}
    try:
        if up.returncode != 0:
            result["error"] = (up.stdout + up.stderr)[-3000:]
            return result
        url = "http://127.0.0.1:8000"
        while time.monotonic() - t0 < timeout_s:
            try:
                with urllib.request.urlopen(url + "/health/ready", timeout=5):
                    break
            except OSError:
                time.sleep(3)
        result["up_to_ready_s"] = round(time.monotonic() - t0, 1)
        logs = subprocess.run([*compose, "logs", "engine-builder"], cwd=ROOT, capture_output=True, text=True).stdout
        result["engine_builder"] = [line for line in logs.splitlines() if re.search(r"built in|parity|nothing to build|recorded", line)]
        result["parity_ok"] = "parity vs ONNX Runtime: OK" in logs
        import base64
        import io

        from PIL import Image

        from training import shapes_world as sw

        rng = np.random.default_rng(3)
        buf = io.BytesIO()
        Image.fromarray(sw.render(sw.sample_scene(rng), rng)).save(buf, "PNG")
        image = base64.b64encode(buf.getvalue()).decode()
        for task, body in (("detect", {"images": [{"image": image, "prompt": PROMPT}]}),
                           ("vqa", {"images": [{"image": image, "question": "how many circles are there?"}]}),
                           ("caption", {"images": [{"image": image}]})):
            req = urllib.request.Request(f"{url}/v1/{task}", data=json.dumps(body).encode(),
                                         headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                result[task] = json.loads(r.read())["results"][0]
        return result
    finally:
        subprocess.run([*compose, "down"], cwd=ROOT, capture_output=True, text=True, timeout=300)


def gpu_facts() -> dict:
    from export.tensorrt import cuda_device_count, cuda_device_name

    facts = {"cuda_devices": cuda_device_count(), "gpu": cuda_device_name()}
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True)
        facts["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    return facts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=Path, default=ROOT / "model_repository", help="the cpu repository")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--skip-triton", action="store_true")
    p.add_argument("--skip-compose", action="store_true")
    p.add_argument("--cpu-dry-run", action="store_true", help="no GPU here: run the CPU halves to check the script")
    p.add_argument("--out", type=Path, default=None, help="result file (default bench/results/gpu_check-<GPU>.json)")
    args = p.parse_args(argv)

    facts = gpu_facts()
    print(f"GPU: {facts}", flush=True)
    if not facts["cuda_devices"] and not args.cpu_dry_run:
        print("no CUDA GPU visible (driver API: 0 devices); run this on the GPU host", file=sys.stderr)
        return EXIT_NO_GPU
    result = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
              "gpu": facts, "dry_run": bool(args.cpu_dry_run)}
    ok = True
    devices = ["cpu"] if args.cpu_dry_run else ["cuda", "cpu"]
    try:
        result["embedded"] = embedded_latency(args.repository, devices, args.rounds)
    except Exception as exc:  # DeviceError: ONNX Runtime did not use the GPU
        result["embedded"] = {"error": f"{type(exc).__name__}: {exc}"}
        ok = False
    print(f"embedded: {result['embedded']}", flush=True)
    if not args.skip_triton:
        result["triton_python_backend"] = triton_concurrency(args.repository)
        print(f"triton (python backend): {result['triton_python_backend']}", flush=True)
    if not args.skip_compose and not args.cpu_dry_run:
        result["compose_gpu"] = compose_gpu_profile()
        ok = ok and result["compose_gpu"].get("parity_ok", "skipped" in result["compose_gpu"])
        print(f"compose GPU profile: {result['compose_gpu']}", flush=True)
    name = re.sub(r"[^A-Za-z0-9]+", "-", facts.get("gpu") or "no-gpu").strip("-")
    out = args.out or RESULTS / f"gpu_check-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return EXIT_OK if ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
